"""The GQA decode attention's long-split count at head dim 64 (Llama-3.2-1B's 32 / 8 heads of 64): the wave count
with the slots the split kernel's registers give (6 programs per SM on a bf16 cache, 5 on fp8:
`ATTN_LONG_SPLIT_SLOTS_PER_SM[16, 64, *]`, "new") against the count head dim 64 took before (about 3 programs per SM
rounded up, "old"). The whole standard step per layer (2 layers in one CUDA graph), the plugin's defaults (512
blocks of 16, budget 2048), bf16 and fp8 e4m3 caches (unit scales).
  sweep: splits forced up to 17 at 64K, B = 4-16, where the new count wants more than the 8 splits the earlier
         sweep (`../../fp8_split_h100_2026-11-27/`) went to; rows "new" and "old" are the two counts.
  ab:    old against new interleaved twice at batches neither sweep measured (out of sample), outputs and
         positions compared.
Writes $OUT/hd64_split_study.json (the recorded run's register rows name the count `n_regs`; the helper it uses
now writes `split_kernel_n_regs` and Triton's cache key)."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, 64
SCALE = 1 / math.sqrt(D)
F8 = torch.float8_e4m3fn
NEW = dict(sa.ATTN_LONG_SPLIT_SLOTS_PER_SM)
OLD = {k: v for k, v in NEW.items() if k[1] != 64}
shipped = sa.attention_plan
cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
res = []


def record(row):
    res.append(row); print(row, flush=True)


def use(slots=None, splits=None):
    """Plan with the given slots table, or with `splits` forced."""
    sa.ATTN_LONG_SPLIT_SLOTS_PER_SM.clear(); sa.ATTN_LONG_SPLIT_SLOTS_PER_SM.update(slots or NEW)
    plan = bsd.forced_split_plan(shipped, splits) if splits else shipped
    sa.attention_plan = sd.attention_plan = plan
    return plan


def case(B, L, fp8, seed):
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=seed + i) for i in range(2)]
    if fp8:
        stack = [(q, kc.to(F8), vc.to(F8), *rest) for q, kc, vc, *rest in stack]
    return stack


def step(stack, fp8):
    """(outputs of the first case, time per layer in us) under the current plan."""
    B = stack[0][0].shape[0]
    scales = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda")) if fp8 else None
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16,
                                  "cuda", kv_dtype=stack[0][1].dtype)
    outs = [t.clone() for t in sd.sparse_decode_triton(*stack[0], cfg, SCALE, workspace=ws, kv_scales=scales)[:2]]
    us = bsd.stacked_time_ms([lambda s=s: sd.sparse_decode_triton(*s, cfg, SCALE, workspace=ws, kv_scales=scales)
                              for s in stack]) * 1e3
    return outs, round(us, 2)


def sweep(fp8, batches, splits_list, L=65536):
    for B in batches:
        stack = case(B, L, fp8, seed=B * 7 + L)
        first = None
        for name, kwargs in [("new", {}), ("old", dict(slots=OLD))] + [(s, dict(splits=s)) for s in splits_list]:
            plan = use(**kwargs)(B, Hq, Hkv, cfg.attended_tokens, D, D, kv_bytes=1 if fp8 else 2)
            outs, us = step(stack, fp8)
            first = first or outs
            record(dict(part="sweep", kv="fp8" if fp8 else "bf16", L=L, B=B, plan=name, splits=plan["NUM_SPLITS"],
                        split_len=plan["SPLIT_LEN"], per_layer_us=us,
                        out_max_abs_diff_vs_new=float((outs[0].float() - first[0].float()).abs().max())))
        del stack; torch.cuda.empty_cache()


def ab(fp8, L, batches):
    for B in batches:
        splits = {n: use(slots=t)(B, Hq, Hkv, cfg.attended_tokens, D, D, kv_bytes=1 if fp8 else 2)["NUM_SPLITS"]
                  for n, t in (("old", OLD), ("new", NEW))}
        row = dict(part="ab", kv="fp8" if fp8 else "bf16", L=L, B=B, splits_old=splits["old"],
                   splits_new=splits["new"])
        if splits["old"] == splits["new"]:
            record(dict(row, same_plan=True)); continue
        stack = case(B, L, fp8, seed=B * 11 + L)
        outs, times = {}, {"old": [], "new": []}
        for rep in range(2):
            for name, table in (("old", OLD), ("new", NEW)):
                use(slots=table)
                outs[name], us = step(stack, fp8)
                times[name].append(us)
        record(dict(row, same_plan=False, old_us=times["old"], new_us=times["new"],
                    new_over_old=round(min(times["new"]) / min(times["old"]), 3),
                    positions_equal=bool(torch.equal(outs["old"][1], outs["new"][1])),
                    out_max_abs_diff=float((outs["old"][0].float() - outs["new"][0].float()).abs().max())))
        del stack; torch.cuda.empty_cache()


for fp8 in (False, True):
    sweep(fp8, (4, 5, 6, 8, 10, 12, 16), (2, 4, 6, 8, 10, 12, 14, 17))
for fp8 in (False, True):
    ab(fp8, 65536, (7, 9, 11, 14, 18, 22, 26, 30, 36, 44, 52))
    ab(fp8, 16384, (64, 80, 96, 128))
use()
sa.attention_plan = sd.attention_plan = shipped
for row in bsd.split_kernel_resources():
    record(dict(part="split_kernel", **row))
json.dump(res, open(os.path.join(OUT, "hd64_split_study.json"), "w"), indent=1)
