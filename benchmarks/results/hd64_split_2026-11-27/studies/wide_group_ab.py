"""The long-split slots table keyed by (BLOCK_H, BLOCK_DV, fp8 cache) ("new", `ATTN_LONG_SPLIT_SLOTS_PER_SM`) against
the table before it ("old": 4 slots on a 16-bit cache and 3 on fp8 at width 128 for BLOCK_H 16-128, the old count at
width 64) where programs hold 32 or 64 q heads, at batches wide_group_sweep.py did not measure (out of sample):
interleaved twice in one process, outputs and positions compared, only where the two plans differ. The whole
standard step per layer (2 layers in one CUDA graph), the plugin's defaults (512 blocks of 16, budget 2048), 32K
contexts, bf16 and fp8 e4m3 caches (unit scales). Writes $OUT/wide_group_ab.json. SHAPES=128: multi-query with 128
q heads (BLOCK_H 128) at head dims 128 and 64 (wide_group_ab128.json)."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
F8 = torch.float8_e4m3fn
NEW = dict(sa.ATTN_LONG_SPLIT_SLOTS_PER_SM)
OLD = {(h, 128, fp8): 3 if fp8 else 4 for h in (16, 32, 64, 128) for fp8 in (False, True)}
OLD.update({k: v for k, v in NEW.items() if k[0] == 16})
cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
res = []


def use(table):
    sa.ATTN_LONG_SPLIT_SLOTS_PER_SM.clear(); sa.ATTN_LONG_SPLIT_SLOTS_PER_SM.update(table)


SHAPES = ((64, 2, 128, (20, 28, 40, 56)), (32, 1, 128, (40, 56, 80, 112)), (64, 1, 128, (40, 56, 80, 112)),
          (64, 2, 64, (20, 28, 40, 56)), (64, 1, 64, (40, 56, 80, 112)))
if os.environ.get("SHAPES") == "128":
    SHAPES = ((128, 1, 128, (40, 56, 80, 112)), (128, 1, 64, (40, 56, 80, 112)))
for Hq, Hkv, D, batches in SHAPES:
    SCALE = 1 / math.sqrt(D)
    for fp8 in (False, True):
        for B in batches:
            splits = {}
            for name, table in (("old", OLD), ("new", NEW)):
                use(table)
                splits[name] = sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D,
                                                 kv_bytes=1 if fp8 else 2)["NUM_SPLITS"]
            row = dict(Hq=Hq, Hkv=Hkv, D=D, kv="fp8" if fp8 else "bf16", B=B, splits_old=splits["old"],
                       splits_new=splits["new"])
            if splits["old"] == splits["new"]:
                res.append(dict(row, same_plan=True)); print(res[-1], flush=True); continue
            stack = [bsd.paged_case(B, 32768, Hq, Hkv, D, D, cfg, seed=B * 13 + Hq + D + i) for i in range(2)]
            if fp8:
                stack = [(q, kc.to(F8), vc.to(F8), *rest) for q, kc, vc, *rest in stack]
            scales = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda")) if fp8 else None
            outs, times = {}, {"old": [], "new": []}
            for rep in range(2):
                for name, table in (("old", OLD), ("new", NEW)):
                    use(table)
                    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg,
                                                  torch.bfloat16, "cuda", kv_dtype=stack[0][1].dtype)
                    outs[name] = [t.clone() for t in sd.sparse_decode_triton(*stack[0], cfg, SCALE, workspace=ws,
                                                                             kv_scales=scales)[:2]]
                    us = bsd.stacked_time_ms([lambda s=s, ws=ws: sd.sparse_decode_triton(
                        *s, cfg, SCALE, workspace=ws, kv_scales=scales) for s in stack]) * 1e3
                    times[name].append(round(us, 2))
            res.append(dict(row, same_plan=False, old_us=times["old"], new_us=times["new"],
                            new_over_old=round(min(times["new"]) / min(times["old"]), 3),
                            positions_equal=bool(torch.equal(outs["old"][1], outs["new"][1])),
                            out_max_abs_diff=float((outs["old"][0].float() - outs["new"][0].float()).abs().max())))
            print(res[-1], flush=True)
            del stack, ws; torch.cuda.empty_cache()
use(NEW)
json.dump(res, open(os.path.join(OUT, f"wide_group_ab{os.environ.get('SHAPES', '')}.json"), "w"), indent=1)
