"""Pipelined (lagged) step whose block stage is joined one layer later: layer l's block stage (whose
ids only the next decode step reads) may then run beside layer l+1's token stage and attention too; the
last layer joins its own. Per-layer block-id buffers (the workspace's are shared by the layers). PDL on,
B=8, budget 2048, per layer with 4 layers in one graph; against the shipped step and the critical path
alone."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.block_select import topk_rows, block_scores_triton
from asynctls_tip_kernels.token_select import token_scores_triton, index_query_triton
from asynctls_tip_kernels.sparse_attention import sparse_attention_triton, pdl_scope
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels import sparse_decode_reference as ref
OUT = os.environ.get("OUT", "/tmp")


def step(i, last, q, kc, vc, table, seq_lens, index, config, scale, prev, ws, ids_out, scores_buf, done, mode):
    B, Hq, _ = q.shape; Hkv = kc.shape[2]; S = config.selection_block_size
    n_sel = table.shape[1] * kc.shape[1] // S
    block_stream, token_stream = ws.streams
    main = torch.cuda.current_stream()
    token_stream.wait_stream(main)
    with pdl_scope(True), torch.cuda.stream(token_stream):
        index_query_triton(q, index.channel_ids, config.index_bits, ws.index_query)
        ts = token_scores_triton(q, index, kc, table, seq_lens, prev, config, out=ws.token_scores, softmax_scale=scale,
                                 index_query=ws.index_query, block_ids_ready=True)
        ev = torch.cuda.Event(); ev.record()
        pos = topk_rows(ts.view(B * Hkv, config.num_blocks * S), config.token_budget,
                        out=ws.positions.view(B * Hkv, config.attended_tokens), block_map=prev.view(B * Hkv, config.num_blocks),
                        map_block_size=S, seq_lens=seq_lens, sink_tokens=config.sink_tokens, local_tokens=config.local_tokens,
                        rows_per_seq=Hkv).view(B, Hkv, config.attended_tokens)
        out = sparse_attention_triton(q, kc, vc, table, pos, scale, out=ws.out, workspace=ws.attention)
    block_stream.wait_event(ev)
    with pdl_scope(True), torch.cuda.stream(block_stream):
        lcfg = ref.lagged_block_config(config)
        bsc = block_scores_triton(q, index, table, seq_lens, lcfg, n_sel, out=scores_buf, softmax_scale=scale)
        topk_rows(bsc.view(B * Hkv, n_sel), config.num_blocks, out=ids_out.view(B * Hkv, config.num_blocks))
        done[i].record()
    main.wait_stream(token_stream)
    if mode == "deferred":
        if i > 0:
            main.wait_event(done[i - 1])
        if last:
            main.wait_event(done[i])
    else:
        main.wait_event(done[i])
    return out, pos, ids_out


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
    ids_bufs = [torch.empty_like(prevs[0]) for _ in range(LAYERS)]
    scores_buf = torch.empty_like(ws.block_scores)
    done = [torch.cuda.Event() for _ in range(LAYERS)]
    for mode in ("shipped", "joined", "deferred", "shipped", "deferred"):
        def fn(i, mode=mode):
            s = stack[i]
            if mode == "shipped":
                return sd.sparse_decode_triton(*s, config, scale, previous_block_ids=prevs[i], workspace=ws)
            return step(i, i == LAYERS - 1, *s, config, scale, prevs[i], ws, ids_bufs[i], scores_buf, done, mode)
        o = fn(0); torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(o, ref_out))
        per_layer = bsd.stacked_time_ms([(lambda i=i: fn(i)) for i in range(LAYERS)]) * 1e3
        row = dict(L=L, budget=budget, mode=mode, per_layer_us=round(per_layer, 2), equal=same)
        res.append(row); print(row, flush=True)
    del stack, ws; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "deferred_join_study.json"), "w"), indent=1)
