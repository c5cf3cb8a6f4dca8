"""Pipelined (lagged) step with PDL on (trigger at the end): where the block stage should join the
token stream now (at the fork, after the token scores as shipped, after the token top-k), the critical
path alone, and the block scorer's tile (blocks per program) in this step. B=8, budget 2048."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels import block_select as bs
from asynctls_tip_kernels.block_select import topk_rows
from asynctls_tip_kernels.token_select import token_scores_triton, index_query_triton
from asynctls_tip_kernels.sparse_attention import sparse_attention_triton, pdl_scope
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")


def variant_step(variant, q, kc, vc, table, seq_lens, index, config, scale, prev, ws):
    B, Hq, _ = q.shape; Hkv = kc.shape[2]; S = config.selection_block_size
    n_sel = table.shape[1] * kc.shape[1] // S
    block_stream, token_stream = ws.streams
    main = torch.cuda.current_stream()
    token_stream.wait_stream(main); block_stream.wait_stream(main)
    ev = {}
    with pdl_scope(True), torch.cuda.stream(token_stream):
        index_query_triton(q, index.channel_ids, config.index_bits, ws.index_query)
        ts = token_scores_triton(q, index, kc, table, seq_lens, prev, config, out=ws.token_scores, softmax_scale=scale,
                                 index_query=ws.index_query, block_ids_ready=True)
        ev["scores"] = torch.cuda.Event(); ev["scores"].record()
        pos = topk_rows(ts.view(B * Hkv, config.num_blocks * S), config.token_budget,
                        out=ws.positions.view(B * Hkv, config.attended_tokens), block_map=prev.view(B * Hkv, config.num_blocks),
                        map_block_size=S, seq_lens=seq_lens, sink_tokens=config.sink_tokens, local_tokens=config.local_tokens,
                        rows_per_seq=Hkv).view(B, Hkv, config.attended_tokens)
        ev["topk"] = torch.cuda.Event(); ev["topk"].record()
        out = sparse_attention_triton(q, kc, vc, table, pos, scale, out=ws.out, workspace=ws.attention)
    ids = None
    if variant != "critical_only":
        with pdl_scope(True), torch.cuda.stream(block_stream):
            if variant in ev:
                block_stream.wait_event(ev[variant])
            ids = sd._select_blocks(q, index, table, seq_lens, config, n_sel, scale, ws, None, prev)
    main.wait_stream(token_stream); main.wait_stream(block_stream)
    return out, pos, ids


res = []
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
for L in (65536, 131072):
    budget = 2048
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=B * 7 + L + i) for i in range(LAYERS)]
    scale = 1 / math.sqrt(D)
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
    prevs = [sd.sparse_decode_triton(*s, config, scale)[2].clone() for s in stack]
    ref_out = [t.clone() for t in sd.sparse_decode_triton(*stack[0], config, scale, previous_block_ids=prevs[0])]
    cases = [("shipped", 128), ("start", 128), ("scores", 128), ("topk", 128), ("critical_only", 128),
             ("shipped", 64), ("shipped", 256), ("shipped", 128)]
    for name, tile in cases:
        bs.BLOCK_SCORE_TILE = tile

        def fn(i, name=name):
            s = stack[i]
            if name == "shipped":
                return sd.sparse_decode_triton(*s, config, scale, previous_block_ids=prevs[i], workspace=ws)
            return variant_step(name, *s, config, scale, prevs[i], ws)

        o = fn(0); torch.cuda.synchronize()
        same = None if name == "critical_only" else all(torch.equal(a, b) for a, b in zip(o, ref_out))
        own = bsd.graph_time_ms(lambda: fn(0)) * 1e3
        per_layer = bsd.stacked_time_ms([(lambda i=i: fn(i)) for i in range(LAYERS)]) * 1e3
        row = dict(L=L, budget=budget, variant=name, block_tile=tile, own_us=round(own, 2), per_layer_us=round(per_layer, 2), equal=same)
        res.append(row); print(row, flush=True)
    bs.BLOCK_SCORE_TILE = 128
    del stack, ws; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "sched_pdl_study.json"), "w"), indent=1)
