"""Token scorer register cap (waves: 2048 programs of 4 warps) and the kernels' registers / shared memory."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".study")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, token_select as ts, sparse_attention as sa, block_select as bs
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D))[2].clone() for s in stack]
    ref = None
    for cap in (None, 32, 40, None, 32, 40):
        ts.TOKEN_SCORE_MAXNREG = cap
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
        us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
        row = dict(L=L, maxnreg=cap, per_layer_us=round(us, 2), equal=all(torch.equal(a, b) for a, b in zip(o, ref)))
        res.append(row); print(row, flush=True)
    ts.TOKEN_SCORE_MAXNREG = None
    del stack; torch.cuda.empty_cache()
for name, fn in (("token_score", ts._token_score_kernel), ("topk", bs._topk_rows_kernel), ("block_score", bs._block_score_kernel),
                 ("attention_split", sa._sparse_attn_split_kernel), ("merge", sa._sparse_attn_merge_kernel)):
    if fn is None:
        continue
    for k in fn.device_caches[0][0].values():
        row = dict(kernel=name, n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared, num_warps=k.metadata.num_warps)
        res.append(row); print(row, flush=True)
json.dump(res, open(os.path.join(OUT, "regs_study.json"), "w"), indent=1)
