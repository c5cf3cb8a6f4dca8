"""How many splits the GQA decode attention should take on an fp8 KV cache: the whole standard step per layer
(2 layers in one CUDA graph) with the attention's split count forced to 1-8 (tiles per split = ceil(tiles /
splits)), against the shipped `attention_plan`'s choice, Qwen3-8B shapes, the plugin's defaults (512 blocks of
16, budget 2048), fp8 e4m3 K and V (unit scales), batches 8-56 at 64K and 16 / 24 / 32 at 32K. The bf16 sweep
this follows (`../../mla_step_bucket_2026-11-27/studies/split_sweep.py`) fitted the wave count's constants to a
bf16 cache; an fp8 tile takes half the shared memory, so more programs might be resident (the run found the
opposite: fewer, bound by registers). "shipped" is `attention_plan`'s count at the code it runs with: the recorded
run (dc504ae) took 4 slots per SM on fp8 too; from 83c27d6 fp8 takes 3. Writes $OUT/fp8_split_sweep.json (KV=bf16:
the same on a bf16 cache, $OUT/bf16_split_sweep.json). HEAD_DIM=64: head dim 64 instead of 128 (Llama-3.2-1B's 32 / 8
heads of 64), written as *_split_sweep_hd64.json, with the split kernel's registers per variant. SPLITS="4,8,12,17"
and BATCHES="4,8,12" (64K only) narrow or widen the grid (the next head-dim-64 sweep: splits up to 17 at B = 4-16),
written as *_split_sweep[_hdD]_grid.json."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, int(os.environ.get("HEAD_DIM", "128"))
SCALE = 1 / math.sqrt(D)
shipped = sa.attention_plan
FP8 = os.environ.get("KV", "fp8") == "fp8"
SCALES = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda")) if FP8 else None


def forced(splits):
    return bsd.forced_split_plan(shipped, splits)


cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
res = []
SPLITS = tuple(int(x) for x in os.environ.get("SPLITS", "1,2,3,4,5,6,8").split(","))
GRID = [(65536, tuple(int(x) for x in os.environ["BATCHES"].split(",")))] if "BATCHES" in os.environ else [
    (65536, (8, 12, 16, 20, 24, 28, 32, 40, 48, 56)), (32768, (16, 24, 32))]
for L, batches in GRID:
    for B in batches:
        stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(2)]
        if FP8:
            f8 = torch.float8_e4m3fn
            stack = [(q, kc.to(f8), vc.to(f8), *rest) for q, kc, vc, *rest in stack]
        ref_out = None
        for name, fn in [("shipped", shipped)] + [(s, forced(s)) for s in SPLITS]:
            sa.attention_plan = sd.attention_plan = fn
            plan = fn(B, Hq, Hkv, cfg.attended_tokens, D, D)
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg,
                                          torch.bfloat16, "cuda", kv_dtype=stack[0][1].dtype)
            out = sd.sparse_decode_triton(*stack[0], cfg, SCALE, workspace=ws, kv_scales=SCALES)[0].float()
            ref_out = out.clone() if ref_out is None else ref_out
            us = bsd.stacked_time_ms([lambda s=s, ws=ws: sd.sparse_decode_triton(*s, cfg, SCALE, workspace=ws,
                                                                                 kv_scales=SCALES)
                                      for s in stack]) * 1e3
            row = dict(L=L, B=B, plan=name, splits=plan["NUM_SPLITS"], split_len=plan["SPLIT_LEN"],
                       programs=B * Hkv * plan["head_blocks"] * plan["NUM_SPLITS"], per_layer_us=round(us, 2),
                       out_max_abs_diff_vs_shipped=float((out - ref_out).abs().max()))
            res.append(row); print(row, flush=True)
        sa.attention_plan = sd.attention_plan = shipped
        del stack, ws; torch.cuda.empty_cache()
for row in bsd.split_kernel_resources():
    res.append(row); print(row)
name = (f"{'fp8' if FP8 else 'bf16'}_split_sweep{'' if D == 128 else f'_hd{D}'}"
        f"{'_grid' if 'SPLITS' in os.environ or 'BATCHES' in os.environ else ''}.json")
json.dump(res, open(os.path.join(OUT, name), "w"), indent=1)
