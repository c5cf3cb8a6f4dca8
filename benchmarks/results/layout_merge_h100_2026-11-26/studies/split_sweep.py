"""Fewer attention splits with the fused merge: the group's last split program merges (its tail reads
GROUP x NUM_SPLITS x Dv floats, so fewer splits make it shorter) against the shipped merge launch with
16 programs per SM (23 splits). Sweep: programs per SM (-> splits), software-pipeline stages, the tail's
head loop unrolled or not. Deferred pipelined step per layer (4 layers in one graph) and the attention
alone, B=8, budget 2048, 64K; each variant's output checked against the shipped step first."""
import json, math, os, sys, importlib.util
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as real_sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
HERE = os.path.dirname(os.path.abspath(__file__))
src = open(os.path.join(HERE, "sparse_attention_fused_merge.py")).read().replace("from .", "from asynctls_tip_kernels.")
LOOP = "            for i in range(tl.minimum(BLOCK_H, GROUP - pid_h * BLOCK_H)):\n"
assert LOOP in src
mods = {}
for name, text in (("fused", src), ("fused_unrolled", src.replace(LOOP, "            for i in tl.static_range(GROUP):\n"))):
    open(f"/tmp/_{name}.py", "w").write(text)
    spec = importlib.util.spec_from_file_location(f"_{name}", f"/tmp/_{name}.py")
    mods[name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(mods[name])


def use(mod):
    sd.sparse_attention_triton, sd.AttentionWorkspace, sd.attention_plan = (
        mod.sparse_attention_triton, mod.AttentionWorkspace, mod.attention_plan)


Hq, Hkv, D, B, LAYERS, L = 32, 8, 128, 8, 4, 65536
SCALE = 1 / math.sqrt(D)
cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
want = sd.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])
pos = [sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i])[1].clone() for i in range(LAYERS)]
variants = [("launch", None, 16, 2)]
for name in ("fused", "fused_unrolled"):
    for pps in (2, 3, 4, 6):
        for stages in (2, 3):
            variants.append((name, name, pps, stages))
variants.append(("launch", None, 16, 2))
res = []
for label, modname, pps, stages in variants:
    mod = mods[modname] if modname else real_sa
    mod.ATTN_PROGRAMS_PER_SM, mod.ATTN_NUM_STAGES = pps, stages
    use(mod)
    plan = mod.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D)
    got = sd.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])
    err = float((got[0].float() - want[0].float()).abs().max())
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
    ids = [p.clone() for p in prevs]

    def step(i, ws=ws, ids=ids):
        o = sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                    block_ids_out=ids[i], defer_block_join=True)
        if i == LAYERS - 1:
            ws.join_block_stage()
        return o
    us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
    ua = bsd.stacked_time_ms([(lambda i=i: mod.sparse_attention_triton(stack[i][0], stack[i][1], stack[i][2], stack[i][3],
                                                                      pos[i], SCALE, workspace=ws.attention))
                              for i in range(LAYERS)]) * 1e3
    row = dict(variant=label, programs_per_sm=pps, num_stages=stages, num_splits=plan["NUM_SPLITS"],
               max_abs_err_vs_shipped=err, deferred_per_layer_us=round(us, 2), attention_alone_us=round(ua, 2))
    res.append(row); print(row, flush=True)
    mod.ATTN_PROGRAMS_PER_SM, mod.ATTN_NUM_STAGES = 16, 2
use(real_sa)
json.dump(res, open(os.path.join(OUT, "split_sweep.json"), "w"), indent=1)
