"""(Ran on 1850df5 plus an uncommitted dot variant; the knobs it sets, PIPELINED_SCORER_ROTATES and SCORER_ROTATE_*, went
with the revert that followed.) A/B of where the pipelined step rotates the query with index_basis="pca", in one process on the working
tree's kernels only (the first A/B, ab_rotate.py, imported HEAD's kernels for both sides through
.baseline_kernels/asynctls_tip_kernels, so it compared the old code with itself): a rotation launch on the
token stream (PIPELINED_SCORER_ROTATES = False, as before this session), the token scorer rotating while it
writes its index query with float32 FMAs (8 coordinates per step) or with tensor-core dots (16 per step);
channels for reference. Deferred pipelined step, per layer with 4 layers in one graph, B=8, budget 2048."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, token_select as ts
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
assert "baseline" not in sd.__file__, sd.__file__

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
VARIANTS = {"launch": (False, False, 8), "fma8": (True, False, 8), "dot16": (True, True, 16)}
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


for L in (65536, 131072):
    for basis in ("pca", "channels"):
        cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True,
                                    index_basis=basis)
        stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
        prevs = [sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D))[2].clone() for s in stack]
        ref = None
        for rep in range(2):
            for name, (rot, dot, bd) in (VARIANTS.items() if basis == "pca" else [("channels", (False, False, 8))]):
                sd.PIPELINED_SCORER_ROTATES, ts.SCORER_ROTATE_DOT, ts.SCORER_ROTATE_BLOCK_D = rot, dot, bd
                us, first = per_layer(cfg, stack, prevs)
                ref = ref or first
                row = dict(L=L, basis=basis, variant=name, rep=rep, per_layer_us=round(us, 2),
                           positions_equal=torch.equal(first[1], ref[1]), blocks_equal=torch.equal(first[2], ref[2]),
                           out_max_diff=float((first[0].float() - ref[0].float()).abs().max()))
                res.append(row); print(row, flush=True)
        del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "rotation_ab_clean.json"), "w"), indent=1)
