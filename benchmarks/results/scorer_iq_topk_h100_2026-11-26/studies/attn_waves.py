"""Attention split: programs per SM (the split count) x register cap, in the deferred step (waves: 80 regs x
128 threads -> 6 resident programs per SM; the shipped plan launches 1472 at B=8, budget 2048)."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D))[2].clone() for s in stack]
    ref = None
    settings = [(16, None), (6, None), (5, None), (7, None), (12, None), (16, 64), (8, 64), (16, 72), (16, None), (6, None)]
    for per_sm, cap in settings:
        sa.ATTN_PROGRAMS_PER_SM, sa.ATTN_MAXNREG = per_sm, cap
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
        ids = [torch.empty_like(prevs[0]) for _ in stack]
        def step(i):
            o = sd.sparse_decode_triton(*stack[i], cfg, 1 / math.sqrt(D), previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=True)
            if i == LAYERS - 1:
                ws.join_block_stage()
            return o
        o = [t.clone() for t in step(0)]; ws.join_block_stage(); torch.cuda.synchronize()
        if ref is None:
            ref = o
        err = (o[0].float() - ref[0].float()).abs().max().item()
        us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
        plan = sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D)
        row = dict(L=L, per_sm=per_sm, maxnreg=cap, splits=plan["NUM_SPLITS"], per_layer_us=round(us, 2), max_err=err,
                   positions_equal=torch.equal(o[1], ref[1]))
        res.append(row); print(row, flush=True)
    sa.ATTN_PROGRAMS_PER_SM, sa.ATTN_MAXNREG = 16, None
    del stack; torch.cuda.empty_cache()
for k in sa._sparse_attn_split_kernel.device_caches[0][0].values():
    row = dict(kernel="split", n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared)
    res.append(row); print(row, flush=True)
json.dump(res, open(os.path.join(OUT, "attn_waves.json"), "w"), indent=1)
