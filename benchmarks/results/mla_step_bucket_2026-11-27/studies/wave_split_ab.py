"""The long splits' count from waves of resident programs (`sparse_attention.long_split_count`, new) against the
old count (about ATTN_LONG_SPLIT_PROGRAMS_PER_SM programs per SM, rounded up), interleaved twice in one
process, outputs compared: (1) the whole standard step per layer (2 layers in one CUDA graph), Qwen3-8B shapes,
the plugin's defaults (512 blocks of 16, budget 2048), bf16 cache, batches 4-56 at 64K; (2) the same on an fp8
cache (unit scales) at B = 8, 24, 40; (3) issue 9's headline: the pipelined step with the deferred join, blocks
of 64 x 128, 4 layers in one graph, B=8 at 64K and 128K. LARGE_BATCHES=1 runs (1) at 16K for B = 50-160 instead.
Writes $OUT/wave_split_ab.json."""
import json, math, os, sys
import torch
import triton
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, 128
SCALE = 1 / math.sqrt(D)
new_count = sa.long_split_count


def old_count(programs, tiles, slots, *_):  # long_split_count takes min_tiles and program_tiles too
    return max(1, triton.cdiv(sa.ATTN_LONG_SPLIT_PROGRAMS_PER_SM * 132, programs))


COUNTS = (("old", old_count), ("new", new_count))
res = []


def record(row):
    res.append(row); print(row, flush=True)


def standard(L, batches, fp8):
    cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
    for B in batches:
        stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(2)]
        scales = None
        if fp8:
            scales = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda"))
            stack = [(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), *rest) for q, kc, vc, *rest in stack]
        outs = {}
        for rep in range(2):
            for name, count in COUNTS:
                sa.long_split_count = count
                plan = sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D)
                ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg,
                                              torch.bfloat16, "cuda", kv_dtype=stack[0][1].dtype)
                outs[name] = [t.clone() for t in sd.sparse_decode_triton(*stack[0], cfg, SCALE, workspace=ws,
                                                                         kv_scales=scales)[:2]]
                us = bsd.stacked_time_ms([lambda s=s, ws=ws: sd.sparse_decode_triton(*s, cfg, SCALE, workspace=ws,
                                                                                     kv_scales=scales)
                                          for s in stack]) * 1e3
                record(dict(part="fp8" if fp8 else "bf16", L=L, B=B, count=name, splits=plan["NUM_SPLITS"], rep=rep,
                            per_layer_us=round(us, 2)))
        sa.long_split_count = new_count
        record(dict(part="fp8" if fp8 else "bf16", L=L, B=B, positions_equal=bool(torch.equal(outs["old"][1], outs["new"][1])),
                    out_max_abs_diff=float((outs["old"][0].float() - outs["new"][0].float()).abs().max())))
        del stack, ws; torch.cuda.empty_cache()


def deferred(L, B=8, layers=4):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(layers)]
    prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
    for rep in range(2):
        for name, count in COUNTS:
            sa.long_split_count = count
            plan = sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D)
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
            ids = [p.clone() for p in prevs]

            def step(i, ws=ws, ids=ids, stack=stack):
                o = sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                            block_ids_out=ids[i], defer_block_join=True)
                if i == layers - 1:
                    ws.join_block_stage()
                return o
            us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(layers)]) * 1e3
            record(dict(part="deferred", L=L, B=B, count=name, splits=plan["NUM_SPLITS"], rep=rep, per_layer_us=round(us, 2)))
    sa.long_split_count = new_count
    del stack; torch.cuda.empty_cache()


if os.environ.get("LARGE_BATCHES") == "1":  # past the sweep's batches: the review's out-of-sample check
    standard(16384, (50, 56, 68, 72, 79, 100, 160), fp8=False)
else:
    standard(65536, (4, 5, 8, 12, 24, 28, 40, 48, 56), fp8=False)
    standard(65536, (8, 24, 40), fp8=True)
    deferred(65536)
    deferred(131072)
json.dump(res, open(os.path.join(OUT, "wave_split_ab.json"), "w"), indent=1)
