"""Block scorer tile / warps in the deferred step (its interference with the critical path), B=8, budget 2048."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, block_select as bs
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D))[2].clone() for s in stack]
    ref = None
    for tile, warps, stages in ((128, 4, 2), (256, 4, 2), (512, 4, 2), (256, 8, 2), (512, 8, 2), (64, 4, 2), (128, 4, 3), (1024, 8, 2), (128, 4, 2)):
        bs.BLOCK_SCORE_TILE, bs.BLOCK_SCORE_WARPS, bs.BLOCK_SCORE_STAGES = tile, warps, stages
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
        ids = [torch.empty_like(prevs[0]) for _ in stack]
        def step(i):
            o = sd.sparse_decode_triton(*stack[i], cfg, 1 / math.sqrt(D), previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=True)
            if i == LAYERS - 1:
                ws.join_block_stage()
            return o
        o = [t.clone() for t in step(0)]; ws.join_block_stage(); torch.cuda.synchronize()
        o[2] = ids[0].clone()
        if ref is None:
            ref = o
        us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
        row = dict(L=L, tile=tile, warps=warps, stages=stages, per_layer_us=round(us, 2),
                   block_ids_equal=torch.equal(o[2], ref[2]))
        res.append(row); print(row, flush=True)
    bs.BLOCK_SCORE_TILE, bs.BLOCK_SCORE_WARPS, bs.BLOCK_SCORE_STAGES = 128, 4, 2
    del stack; torch.cuda.empty_cache()
for k in bs._block_score_kernel.device_caches[0][0].values():
    row = dict(kernel="block_score", n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared, warps=k.metadata.num_warps)
    res.append(row); print(row, flush=True)
json.dump(res, open(os.path.join(OUT, "block_tile_study.json"), "w"), indent=1)
