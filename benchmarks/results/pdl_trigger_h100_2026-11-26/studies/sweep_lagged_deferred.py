"""Launch settings of the token-stage and attention kernels, timed as the pipelined step with the
deferred join, PDL on, per layer with 4 layers in one graph (B=8, 64K, budget 2048): does the best
setting move now that the block stage is off the critical path and kernels overlap their launches?"""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import block_select, sparse_attention, token_select
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, L, LAYERS = 32, 8, 128, 8, int(os.environ.get("CTX", 65536)), 4
config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=B * 7 + L + i) for i in range(LAYERS)]
scale = 1 / math.sqrt(D)
rows = []


def run(name, module, settings):
    saved = {k: getattr(module, k) for k in settings}
    for k, v in settings.items():
        setattr(module, k, v)
    try:  # a workspace per setting: the attention's split count depends on its launch settings
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, config,
                                      torch.bfloat16, "cuda")
        us = bsd._ours_per_layer_ms(stack, config, scale, ws, True, True) * 1e3
    finally:
        for k, v in saved.items():
            setattr(module, k, v)
    rows.append(dict(stage=name, us=round(us, 2), **settings))
    print(rows[-1], flush=True)


run("default", token_select, {})
for sub in (1, 2, 4):
    for warps in (4, 8):
        run("token_scores", token_select, dict(WORD_SCORE_SUB=sub, WORD_SCORE_WARPS=warps))
for large in (4, 8, 16):
    run("topk", block_select, dict(TOPK_WARPS_LARGE=large))
for per_sm in (4, 8, 16, 32):
    for block_n, warps, stages in ((32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 3), (16, 4, 3), (16, 2, 2)):
        run("attention", sparse_attention, dict(ATTN_PROGRAMS_PER_SM=per_sm, ATTN_BLOCK_N=block_n,
                                                ATTN_NUM_WARPS=warps, ATTN_NUM_STAGES=stages))
run("default", token_select, {})
json.dump(rows, open(os.path.join(OUT, f"sweep_lagged_deferred_{L}.json"), "w"), indent=1)
