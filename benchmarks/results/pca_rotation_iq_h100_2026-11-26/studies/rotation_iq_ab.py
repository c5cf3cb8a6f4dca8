"""(Ran on the working tree of 1c53fb4 plus the change it measures, dropped afterwards: the rotation kernel writing
the index query, PIPELINED_ROTATION_WRITES_INDEX_QUERY.) A/B in one process on the working tree's kernels only (asserted): index_basis="pca" in the pipelined step, the
query's rotation launch also writing the token scorer's index query so the scorer gathers block ids and the block
table before its PDL wait (sparse_decode.PIPELINED_ROTATION_WRITES_INDEX_QUERY = True) against the scorer writing
the index query itself after the rotation (False, as before); channels for reference. Per layer with 4 layers in
one graph, B=8, budget 2048, lagged (pipelined) and deferred, two repeats; outputs compared."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
assert os.path.realpath(sd.__file__).startswith(os.path.realpath("kernels")), sd.__file__
assert hasattr(sd, "PIPELINED_ROTATION_WRITES_INDEX_QUERY")

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
res = []


def per_layer(cfg, stack, prevs, defer):
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
    ids = [torch.empty_like(prevs[0]) for _ in stack]
    steps = []
    for i, s in enumerate(stack):
        def step(i=i, s=s):
            o = sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D), previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=defer)
            if defer and i == len(stack) - 1:
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
        ref = {}
        for rep in range(2):
            for variant in ((True, False) if basis == "pca" else (True,)):
                sd.PIPELINED_ROTATION_WRITES_INDEX_QUERY = variant
                for defer in (False, True):
                    us, first = per_layer(cfg, stack, prevs, defer)
                    ref.setdefault(defer, first)
                    row = dict(L=L, basis=basis, rotation_writes_iq=variant, defer=defer, rep=rep,
                               per_layer_us=round(us, 2), equal=all(torch.equal(a, b) for a, b in zip(first, ref[defer])))
                    res.append(row); print(row, flush=True)
        sd.PIPELINED_ROTATION_WRITES_INDEX_QUERY = True
        del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "rotation_iq_ab.json"), "w"), indent=1)
