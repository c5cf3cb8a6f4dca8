"""The fp8 cache's long-split count at 3 resident programs per SM (`ATTN_LONG_SPLIT_SLOTS_PER_SM[16, 128, True]`, new)
against 4 (the bf16 cache's, what fp8 took before), interleaved twice in one process, outputs and positions
compared: the whole standard step per layer (2 layers in one CUDA graph), Qwen3-8B shapes, the plugin's
defaults (512 blocks of 16, budget 2048), fp8 e4m3 K and V (unit scales); batches outside fp8_split_sweep.py's
(out of sample) at 64K and, past them, at 16K, and three of its batches again. Also the split kernel's
registers, spills and shared memory per compiled variant (why fp8 fits fewer programs per SM). Writes
$OUT/fp8_slots_ab.json."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, 128
SCALE = 1 / math.sqrt(D)
F8 = torch.float8_e4m3fn
SCALES = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda"))
SLOTS = (("old", 4), ("new", 3))  # from 2026-11-27's head-dim-64 change, ATTN_LONG_SPLIT_SLOTS_PER_SM[16, 128, True]
cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
res = []


def record(row):
    res.append(row); print(row, flush=True)


def ab(L, batches, sample):
    for B in batches:
        stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 11 + L + i) for i in range(2)]
        stack = [(q, kc.to(F8), vc.to(F8), *rest) for q, kc, vc, *rest in stack]
        outs, splits = {}, {}
        for rep in range(2):
            for name, slots in SLOTS:
                sa.ATTN_LONG_SPLIT_SLOTS_PER_SM[16, 128, True] = slots
                splits[name] = sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D, kv_bytes=1)["NUM_SPLITS"]
                ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg,
                                              torch.bfloat16, "cuda", kv_dtype=F8)
                outs[name] = [t.clone() for t in sd.sparse_decode_triton(*stack[0], cfg, SCALE, workspace=ws,
                                                                         kv_scales=SCALES)[:2]]
                us = bsd.stacked_time_ms([lambda s=s, ws=ws: sd.sparse_decode_triton(*s, cfg, SCALE, workspace=ws,
                                                                                     kv_scales=SCALES)
                                          for s in stack]) * 1e3
                record(dict(L=L, B=B, sample=sample, slots=name, splits=splits[name], rep=rep,
                            per_layer_us=round(us, 2)))
        sa.ATTN_LONG_SPLIT_SLOTS_PER_SM[16, 128, True] = SLOTS[1][1]
        record(dict(L=L, B=B, sample=sample, same_plan=splits["old"] == splits["new"],
                    positions_equal=bool(torch.equal(outs["old"][1], outs["new"][1])),
                    out_max_abs_diff=float((outs["old"][0].float() - outs["new"][0].float()).abs().max())))
        del stack, ws; torch.cuda.empty_cache()


def split_kernel_resources():
    """Registers, spills and shared memory of every compiled split-kernel variant (Triton's kernel cache)."""
    rows = []
    try:
        for caches in sa._sparse_attn_split_kernel.device_caches.values():
            for key, kernel in caches[0].items():
                meta = kernel.metadata
                rows.append(dict(kv_fp8="fp8e4nv" in str(key),
                                 n_regs=getattr(kernel, "n_regs", None), n_spills=getattr(kernel, "n_spills", None),
                                 shared=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                                 num_stages=getattr(meta, "num_stages", None), key=str(key)[:400]))
    except Exception as e:  # the cache layout is Triton's internals: record what failed instead
        rows.append(dict(error=repr(e)))
    return rows


ab(65536, (5, 6, 10, 13, 14, 18, 22, 36, 44), "out")
ab(65536, (8, 24, 40), "in")
ab(16384, (52, 64, 72, 96, 128), "out")
bf16 = bsd.paged_case(24, 16384, Hq, Hkv, D, D, cfg, seed=3)  # compiles the bf16 cache's variant for the table
sd.sparse_decode_triton(*bf16, cfg, SCALE)
torch.cuda.synchronize()
resources = split_kernel_resources()
for r in resources:
    print({k: v for k, v in r.items() if k != "key"})
json.dump(dict(rows=res, split_kernel=resources), open(os.path.join(OUT, "fp8_slots_ab.json"), "w"), indent=1)
