"""How many splits the GQA decode attention should take per batch: the whole standard step per layer (2 layers
in one CUDA graph) with the attention's split count forced to 1-8 (tiles per split = ceil(tiles / splits)),
against the shipped `attention_plan`'s choice, Qwen3-8B shapes, bf16, the plugin's defaults (512 blocks of 16,
budget 2048), batches 8-48 at 64K (and 16 / 24 / 32 at 32K). Follows plan_bucket_ab.py, whose B=24 row had
three splits 7-8% slower than two. Writes $OUT/split_sweep.json."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, 128
SCALE = 1 / math.sqrt(D)
shipped = sa.attention_plan


def forced(splits):
    return bsd.forced_split_plan(shipped, splits)


cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
res = []
for L, batches in ((65536, (8, 12, 16, 20, 24, 28, 32, 40, 48)), (32768, (16, 24, 32))):
    for B in batches:
        stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(2)]
        base = shipped(B, Hq, Hkv, cfg.attended_tokens, D, D)
        for name, fn in [("shipped", shipped)] + [(s, forced(s)) for s in (1, 2, 3, 4, 5, 6, 8)]:
            sa.attention_plan = sd.attention_plan = fn
            plan = fn(B, Hq, Hkv, cfg.attended_tokens, D, D)
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg,
                                          torch.bfloat16, "cuda")
            us = bsd.stacked_time_ms([lambda s=s, ws=ws: sd.sparse_decode_triton(*s, cfg, SCALE, workspace=ws)
                                      for s in stack]) * 1e3
            row = dict(L=L, B=B, plan=name, splits=plan["NUM_SPLITS"], split_len=plan["SPLIT_LEN"],
                       programs=B * Hkv * plan["head_blocks"] * plan["NUM_SPLITS"], per_layer_us=round(us, 2))
            res.append(row); print(row, flush=True)
        sa.attention_plan = sd.attention_plan = shipped
        del stack, ws; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "split_sweep.json"), "w"), indent=1)
