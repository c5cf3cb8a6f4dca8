"""Deferred step: shipped vs without the block stage (critical path alone) vs the block stage's scorer alone
(no block top-k), per layer, 4 layers in one graph, B=8, budget 2048 (timing only)."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
real_select, real_topk = sd._select_blocks, sd.topk_rows
res = []


def no_block_stage(query, index, block_table, seq_lens, config, n_sel, scale, ws, index_query, previous_block_ids,
                   block_ids_out=None):
    return block_ids_out


def scorer_only(query, index, block_table, seq_lens, config, n_sel, scale, ws, index_query, previous_block_ids,
                block_ids_out=None):
    cfg = sd._reference.lagged_block_config(config) if config.lagged_selection else config
    sd.block_scores_triton(query, index, block_table, seq_lens, cfg, n_sel, out=ws.block_scores, softmax_scale=scale)
    return block_ids_out


for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D))[2].clone() for s in stack]
    for v in ("shipped", "no_block_stage", "block_scorer_only", "shipped", "no_block_stage", "block_scorer_only"):
        sd._select_blocks = {"no_block_stage": no_block_stage, "block_scorer_only": scorer_only}.get(v, real_select)
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
        ids = [prevs[i].clone() for i in range(LAYERS)]
        def step(i):
            o = sd.sparse_decode_triton(*stack[i], cfg, 1 / math.sqrt(D), previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=True)
            if i == LAYERS - 1:
                ws.join_block_stage()
            return o
        us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
        row = dict(L=L, variant=v, per_layer_us=round(us, 2)); res.append(row); print(row, flush=True)
    sd._select_blocks = real_select
    del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "crit_study.json"), "w"), indent=1)
