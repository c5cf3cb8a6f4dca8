"""Scratch: scheduling variants of the pipelined lagged step (timed as CUDA graphs, whole step)."""
import math, sys, json, os
import torch
from bench_sparse_decode import QWEN3_8B, graph_time_ms, paged_case
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton, _select_blocks
from asynctls_tip_kernels.token_select import index_query_triton, token_scores_triton
from asynctls_tip_kernels.block_select import topk_rows
from asynctls_tip_kernels.sparse_attention import sparse_attention_triton

L = int(sys.argv[1]); B = 8
Hq, Hkv, D = 32, 8, 128
config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
q, kc, vc, table, seq_lens, index = paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], kc.shape[1], config, q.dtype, "cuda")
scale = 1 / math.sqrt(D)
prev = sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale)[2].clone()
n_sel = ws.num_selection_blocks
side = ws.side_stream
hp = torch.cuda.Stream(priority=-5)  # clamps to the highest
lp = torch.cuda.Stream(priority=0)
S = 64

def token_path(iq=True):
    if iq:
        index_query_triton(q, index.channel_ids, config.index_bits, ws.index_query)
    ts = token_scores_triton(q, index, kc, table, seq_lens, prev, config, out=ws.token_scores, softmax_scale=scale,
                             index_query=ws.index_query)
    pos = topk_rows(ts.view(B * Hkv, -1), 2048, out=ws.positions.view(B * Hkv, -1), block_map=prev.view(B * Hkv, -1),
                    map_block_size=S, seq_lens=seq_lens, sink_tokens=64, local_tokens=64, rows_per_seq=Hkv)
    return sparse_attention_triton(q, kc, vc, table, ws.positions, scale, out=ws.out, workspace=ws.attention)

def block_path():
    return _select_blocks(q, index, table, seq_lens, config, n_sel, scale, ws, None, prev)

def serial():
    return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config.with_(lagged_selection=False), scale)

def shipped():
    return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, previous_block_ids=prev, workspace=ws)

def late_launch():
    main = torch.cuda.current_stream()
    index_query_triton(q, index.channel_ids, config.index_bits, ws.index_query)
    ev = torch.cuda.Event(); ev.record(main)
    ts = token_scores_triton(q, index, kc, table, seq_lens, prev, config, out=ws.token_scores, softmax_scale=scale,
                             index_query=ws.index_query)
    side.wait_event(ev)
    with torch.cuda.stream(side):
        block_path()
    topk_rows(ts.view(B * Hkv, -1), 2048, out=ws.positions.view(B * Hkv, -1), block_map=prev.view(B * Hkv, -1),
              map_block_size=S, seq_lens=seq_lens, sink_tokens=64, local_tokens=64, rows_per_seq=Hkv)
    sparse_attention_triton(q, kc, vc, table, ws.positions, scale, out=ws.out, workspace=ws.attention)
    main.wait_stream(side)

def prio(main_first):
    def f():
        main = torch.cuda.current_stream()
        hp.wait_stream(main); lp.wait_stream(main)
        if main_first:
            with torch.cuda.stream(hp):
                token_path()
            with torch.cuda.stream(lp):
                block_path()
        else:
            with torch.cuda.stream(lp):
                block_path()
            with torch.cuda.stream(hp):
                token_path()
        main.wait_stream(hp); main.wait_stream(lp)
    return f

def two_streams_no_prio():
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    token_path_stream = main
    with torch.cuda.stream(side):
        block_path()
    token_path()
    main.wait_stream(side)

def token_only():
    token_path()

variants = dict(serial_nonlagged=serial, shipped_fork_iq=shipped, late_launch=late_launch,
                prio_main_first=prio(True), prio_block_first=prio(False), fork_before_iq=two_streams_no_prio,
                token_path_alone=token_only, block_path_alone=block_path)
res = {}
for rep in range(2):
    for name, fn in variants.items():
        us = graph_time_ms(fn) * 1e3
        res.setdefault(name, []).append(us)
print(f"L={L}: " + ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in res.items()), flush=True)
json.dump(res, open(os.environ["OUT"] + f"/pipeline_variants_{L}.json", "w"), indent=1)
