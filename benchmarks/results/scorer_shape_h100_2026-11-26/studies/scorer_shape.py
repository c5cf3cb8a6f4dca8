"""The token scorer's launch shape in the deferred pipelined step, now including programs of 1-2 warps
(the earlier sweeps covered 4-8 warps x 1-4 candidates per thread): with 2 warps x 4 candidates the 2,048
programs fit one wave (16 per SM) instead of 1.55. Per layer, 4 layers in one graph, B=8, budget 2048,
64K and 128K, `index_basis` channels; outputs compared with the shipped shape (4 warps x 2)."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, token_select as ts
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SHAPES = [(4, 2), (2, 4), (2, 2), (1, 4), (1, 8), (2, 8), (4, 4), (4, 2)]  # (warps, candidates per thread); shipped first and last
res = []


def per_layer(cfg, stack, prevs):
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
    ids = [torch.empty_like(prevs[0]) for _ in stack]
    steps = []
    for i, s in enumerate(stack):
        def step(i=i, s=s):
            o = sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D), previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=True)
            if i == len(stack) - 1:
                ws.join_block_stage()
            return o
        steps.append(step)
    first = [t.clone() for t in steps[0]()]
    ws.join_block_stage()
    torch.cuda.synchronize()
    return bsd.stacked_time_ms(steps) * 1e3, first


for L in [int(x) for x in os.environ.get("CTXS", "65536,131072").split(",")]:
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D))[2].clone() for s in stack]
    dense = bsd._dense_per_layer_ms(stack, stack[0][0].view(B, Hq, 1, D), L, 1 / math.sqrt(D)) * 1e3
    ref = None
    for rep in range(2):
        for warps, sub in SHAPES:
            ts.WORD_SCORE_WARPS, ts.WORD_SCORE_SUB = warps, sub
            try:
                us, first = per_layer(cfg, stack, prevs)
            except Exception as e:  # a shape the compiler refuses
                res.append(dict(L=L, warps=warps, sub=sub, error=str(e)[:200])); print(res[-1], flush=True)
                continue
            if ref is None:
                ref = first
            row = dict(L=L, rep=rep, warps=warps, sub=sub, per_layer_us=round(us, 2), dense_us=round(dense, 1),
                       speedup=round(dense / us, 2), equal=all(torch.equal(a, b) for a, b in zip(first, ref)))
            res.append(row); print(row, flush=True)
    ts.WORD_SCORE_WARPS, ts.WORD_SCORE_SUB = 4, 2
    del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "scorer_shape.json"), "w"), indent=1)
