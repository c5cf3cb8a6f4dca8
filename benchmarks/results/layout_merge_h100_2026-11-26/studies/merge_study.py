"""The fused merge (the group's last split program merges, `sparse_attention.ATTN_FUSED_MERGE`) against the
merge launch, in situ: per-layer time of the deferred pipelined step and the standard step, 4 layers in one
graph, B=8, budget 2048, interleaved A/B in one process; outputs of the two compared first."""
import json, math, os, sys, importlib.util
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
# The kernel file as measured (the fused merge was not kept in kernels/): loaded beside the package.
_FM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_attention_fused_merge.py")
open("/tmp/_fm.py", "w").write(open(_FM_PATH).read().replace("from .", "from asynctls_tip_kernels."))
_spec = importlib.util.spec_from_file_location("sparse_attention_fused_merge", "/tmp/_fm.py")
fm = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(fm)
sd.sparse_attention_triton, sd.AttentionWorkspace = fm.sparse_attention_triton, fm.AttentionWorkspace
sa = fm
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SCALE = 1 / math.sqrt(D)
res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    std_cfg = cfg.with_(lagged_selection=False)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    dense_us = bsd._dense_per_layer_ms(stack, stack[0][0].view(B, Hq, 1, D), L, SCALE) * 1e3
    prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
    outs = {}
    for fused in (False, True):
        sa.ATTN_FUSED_MERGE = fused
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, std_cfg, torch.bfloat16, "cuda")
        outs[fused] = [sd.sparse_decode_triton(*stack[0], std_cfg, SCALE, workspace=ws)[0].clone() for _ in range(2)]
    check = dict(L=L, fused_equals_launch=bool(torch.equal(outs[True][0], outs[False][0])),
                 max_abs_diff=float((outs[True][0].float() - outs[False][0].float()).abs().max()),
                 repeat_equal=bool(torch.equal(outs[True][0], outs[True][1])))
    res.append(check); print(check, flush=True)
    for rep in range(3):
        for fused in (False, True):
            sa.ATTN_FUSED_MERGE = fused
            for v in ("deferred", "standard"):
                c = std_cfg if v == "standard" else cfg
                ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, c, torch.bfloat16, "cuda")
                ids = [p.clone() for p in prevs]

                def step(i, c=c, ws=ws, ids=ids, v=v):
                    if v == "standard":
                        return sd.sparse_decode_triton(*stack[i], c, SCALE, workspace=ws)
                    o = sd.sparse_decode_triton(*stack[i], c, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                                block_ids_out=ids[i], defer_block_join=True)
                    if i == LAYERS - 1:
                        ws.join_block_stage()
                    return o
                us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
                row = dict(L=L, fused_merge=fused, variant=v, rep=rep, per_layer_us=round(us, 2),
                           dense_per_layer_us=round(dense_us, 2), speedup=round(dense_us / us, 2))
                res.append(row); print(row, flush=True)
    sa.ATTN_FUSED_MERGE = True
    del stack, prevs
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "merge_study.json"), "w"), indent=1)
