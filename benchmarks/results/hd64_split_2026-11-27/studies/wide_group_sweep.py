"""The long-split count where a program holds 32, 64 or 128 q heads (BLOCK_H 32-128: groups of more than 16 q heads
per kv head), which no sweep had measured: splits 1-4, 6, 8, 10, 12, 14 and 17 forced against the shipped count (the
wave count at each slot count in SLOTS is recorded, not run), the whole standard step per layer (2 layers in one
CUDA graph), the plugin's defaults (512 blocks of 16, budget 2048), 32K contexts, bf16 and fp8 e4m3 caches (unit
scales). Shapes: groups of 32 at head dim 128 (64 q heads, 2 kv heads) and at head dim 64, and multi-query attention
at head dim 128 (32 q heads, 1 kv head). Also the split kernel's registers per compiled variant. Writes
$OUT/wide_group_sweep.json. SHAPES=64: multi-query attention with 64 q heads (BLOCK_H 64) at head dims 128 and 64,
splits 1-6, 8, 10, 12, 14 and 17 (wide_group_sweep64.json); SHAPES=128: the same with 128 q heads (BLOCK_H 128),
then one float32 call (query and cache) at 32 / 8 heads of 128 and of 64 for its registers
(wide_group_sweep128.json). "shipped" is `attention_plan` at the code it runs with. The recorded runs without SHAPES
and with SHAPES=64 ran on this session's first version of the table (keyed by width and fp8 only: 4 / 3 slots at
width 128 for any BLOCK_H, 6 / 5 at width 64 for BLOCK_H 16 only, the old count otherwise); SHAPES=128's on 72d5179's
table, which had no BLOCK_H 128 entries (the old count)."""
import json, math, os, sys
import torch
import triton
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
F8 = torch.float8_e4m3fn
SLOTS = (2, 3, 4, 5, 6)
SPLITS = (1, 2, 3, 4, 6, 8, 10, 12, 14, 17)
shipped = sa.attention_plan
cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
res = []


SHAPES = ((64, 2, 128, (16, 24, 32, 48, 64)), (64, 2, 64, (16, 24, 32, 48, 64)), (32, 1, 128, (32, 48, 64, 96)))
if os.environ.get("SHAPES") == "64":  # 64 q heads per program (BLOCK_H 64): multi-query attention with 64 q heads
    SHAPES, SPLITS = ((64, 1, 128, (32, 48, 64, 96)), (64, 1, 64, (32, 48, 64, 96))), (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 17)
if os.environ.get("SHAPES") == "128":  # 128 q heads per program (BLOCK_H 128): multi-query with 128 q heads
    SHAPES, SPLITS = ((128, 1, 128, (32, 48, 64, 96)), (128, 1, 64, (32, 48, 64, 96))), (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 17)
for Hq, Hkv, D, batches in SHAPES:
    for fp8 in (False, True):
        for B in batches:
            stack = [bsd.paged_case(B, 32768, Hq, Hkv, D, D, cfg, seed=B * 5 + Hq + D + i) for i in range(2)]
            if fp8:
                stack = [(q, kc.to(F8), vc.to(F8), *rest) for q, kc, vc, *rest in stack]
            SCALE = 1 / math.sqrt(D)
            scales = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda")) if fp8 else None
            p0 = shipped(B, Hq, Hkv, cfg.attended_tokens, D, D, kv_bytes=1 if fp8 else 2)
            programs = B * Hkv * p0["head_blocks"]
            tiles = triton.cdiv(cfg.attended_tokens, p0["BLOCK_N"])
            wave = {s: sa.long_split_count(programs, tiles, s * 132, sa.ATTN_LONG_SPLIT_MIN_TILES,
                                           sa.ATTN_LONG_SPLIT_PROGRAM_TILES) for s in SLOTS}
            first = None
            for name, fn in [("shipped", shipped)] + [(s, bsd.forced_split_plan(shipped, s)) for s in SPLITS]:
                sa.attention_plan = sd.attention_plan = fn
                plan = fn(B, Hq, Hkv, cfg.attended_tokens, D, D, kv_bytes=1 if fp8 else 2)
                ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg,
                                              torch.bfloat16, "cuda", kv_dtype=stack[0][1].dtype)
                out = sd.sparse_decode_triton(*stack[0], cfg, SCALE, workspace=ws,
                                              kv_scales=scales)[0].float()
                first = out.clone() if first is None else first
                us = bsd.stacked_time_ms([lambda s=s, ws=ws: sd.sparse_decode_triton(*s, cfg, SCALE, workspace=ws,
                                                                                     kv_scales=scales)
                                          for s in stack]) * 1e3
                row = dict(Hq=Hq, Hkv=Hkv, D=D, kv="fp8" if fp8 else "bf16", B=B, plan=name,
                           splits=plan["NUM_SPLITS"], block_h=plan["BLOCK_H"], num_warps=plan["num_warps"],
                           num_stages=plan["num_stages"], wave_count_by_slots=wave, per_layer_us=round(us, 2),
                           out_max_abs_diff_vs_shipped=float((out - first).abs().max()))
                res.append(row); print(row, flush=True)
            sa.attention_plan = sd.attention_plan = shipped
            del stack, ws; torch.cuda.empty_cache()
if os.environ.get("SHAPES") == "128":  # registers of float32 queries and caches (the slots are 16-bit queries')
    for D in (128, 64):
        q, kc, vc, *rest = bsd.paged_case(8, 32768, 32, 8, D, D, cfg, seed=D)
        q, kc, vc = q.float(), kc.float(), vc.float()
        try:
            sd.sparse_decode_triton(q, kc, vc, *rest, cfg, 1 / math.sqrt(D))
            torch.cuda.synchronize()
        except Exception as e:  # record it rather than lose the sweep
            res.append(dict(float32_case=D, error=repr(e)[:500])); print(res[-1])
for row in bsd.split_kernel_resources():
    res.append(row); print(row)
json.dump(res, open(os.path.join(OUT, f"wide_group_sweep{os.environ.get('SHAPES', '')}.json"), "w"), indent=1)
