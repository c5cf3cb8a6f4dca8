"""Attention split: pipeline stages x split count with the merge launch (the fused-merge sweep of the same day
found 3 stages far better than 2 once splits are long: the position -> block table -> K/V chain is three
dependent loads). Deferred step per layer and the attention alone on the step's positions, 4 layers in one
graph, B=8, budget 2048, 64K and 128K; outputs compared with the shipped setting (16 programs per SM, 2 stages)."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
# The base knobs are studied here; the long-split plan that came out of this study would override them.
sa.ATTN_LONG_SPLITS = False
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SCALE = 1 / math.sqrt(D)
res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
    pos = [sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i])[1].clone() for i in range(LAYERS)]
    want = sd.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])[0].clone()
    settings = [(16, 2)] + [(p, s) for p in (2, 3, 4, 6, 8, 16) for s in (2, 3, 4) if (p, s) != (16, 2)] + [(16, 2)]
    for per_sm, stages in settings:
        sa.ATTN_PROGRAMS_PER_SM, sa.ATTN_NUM_STAGES = per_sm, stages
        plan = sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D)
        got = sd.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])[0]
        err = float((got.float() - want.float()).abs().max())
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
        ids = [p.clone() for p in prevs]

        def step(i, ws=ws, ids=ids):
            o = sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=True)
            if i == LAYERS - 1:
                ws.join_block_stage()
            return o
        us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
        ua = bsd.stacked_time_ms([(lambda i=i: sa.sparse_attention_triton(stack[i][0], stack[i][1], stack[i][2], stack[i][3],
                                                                        pos[i], SCALE, workspace=ws.attention))
                                  for i in range(LAYERS)]) * 1e3
        row = dict(L=L, programs_per_sm=per_sm, num_stages=stages, splits=plan["NUM_SPLITS"], max_err=err,
                   deferred_per_layer_us=round(us, 2), attention_alone_us=round(ua, 2))
        res.append(row); print(row, flush=True)
    sa.ATTN_PROGRAMS_PER_SM, sa.ATTN_NUM_STAGES = 16, 2
    del stack, prevs, pos; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "attn_stages.json"), "w"), indent=1)
