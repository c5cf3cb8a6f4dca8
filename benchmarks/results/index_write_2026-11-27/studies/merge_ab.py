"""The split merge at large budgets (GPU, no vLLM): the shipped `merge_plan` (chunks of at most
MERGE_CHUNK_ELEMENTS past MERGE_TILE_ELEMENTS accumulator values, 2026-11-27) against the one-tile merge it
replaced there (MERGE_TILE_ELEMENTS set past every plan), in one run: the whole operator step from a CUDA
graph, the merge kernel's eager device time, and the largest output difference. A budget-2048 row checks
that the plans measured before are unchanged (one tile in both). Writes $OUT/merge_ab.json."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from bench_sparse_decode import MLA, QWEN3_8B, graph_time_ms, paged_case  # noqa: E402
from profile_sparse_decode import kernel_times_us  # noqa: E402

from asynctls_tip_kernels import sparse_attention  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton  # noqa: E402

# (operator, batch, context, budget)
CASES = [("mla", 1, 32768, 8192), ("mla", 1, 65536, 16384), ("gqa", 1, 65536, 8192), ("gqa", 1, 131072, 16384),
         ("mla", 16, 32768, 2048)]


def build_step(kind, B, L, budget, heads=16):
    """The whole operator step on a random paged case (`paged_case`): (step, shapes (B, Hq, Hkv, P, Dk, Dv))."""
    num_blocks = max(128, budget // 64)
    if kind == "mla":
        Hq, Hkv, Dk, Dv = heads, 1, MLA["kv_lora_rank"] + MLA["rope_dim"], MLA["kv_lora_rank"]
        config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=num_blocks, token_budget=budget)
        scale = 1.0 / math.sqrt(192)
    else:
        Hq, Hkv = QWEN3_8B["num_q_heads"], QWEN3_8B["num_kv_heads"]
        Dk = Dv = QWEN3_8B["head_dim"]
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=num_blocks, token_budget=budget)
        scale = 1.0 / math.sqrt(Dk)
    q, kc, vc, table, seq_lens, index = paged_case(B, L, Hq, Hkv, Dk, Dv, config, mla=kind == "mla", seed=1)
    workspaces = {}

    def step():  # a workspace per attention plan (the plan sizes its split buffers)
        plan = tuple(sorted(sparse_attention.attention_plan(B, Hq, Hkv, config.attended_tokens, Dk, Dv).items()))
        if plan not in workspaces:
            workspaces[plan] = SparseDecodeWorkspace(B, Hq, Hkv, Dk, Dv, table.shape[1], kc.shape[1], config, q.dtype,
                                                     "cuda")
        return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=workspaces[plan])

    return step, (B, Hq, Hkv, config.attended_tokens, Dk, Dv)


def run(kind, B, L, budget):
    step, (B, Hq, Hkv, P, Dk, Dv) = build_step(kind, B, L, budget)
    plan = sparse_attention.attention_plan(B, Hq, Hkv, P, Dk, Dv)
    row = dict(device=torch.cuda.get_device_name(), operator=kind, batch=B, context=L, budget=budget,
               splits=plan["NUM_SPLITS"], merge_plan=sparse_attention.merge_plan(plan["NUM_SPLITS"], Dv))
    saved = sparse_attention.MERGE_TILE_ELEMENTS
    outs = {}
    for name, tile in (("shipped", saved), ("one_tile", 1 << 40)):
        sparse_attention.MERGE_TILE_ELEMENTS = tile
        try:
            outs[name] = step()[0].float().clone()
            row[f"{name}_step_us"] = graph_time_ms(step) * 1e3
            row[f"{name}_merge_kernel_us"] = sum(us for k, us in kernel_times_us(step).items() if "merge" in k)
        finally:
            sparse_attention.MERGE_TILE_ELEMENTS = saved
    row["max_abs_diff"] = float((outs["shipped"] - outs["one_tile"]).abs().max())
    row["step_ratio_one_tile_over_shipped"] = row["one_tile_step_us"] / row["shipped_step_us"]
    return row


def run_cases(cases, run, describe, name):
    """`run(*case)` for each case, printing `describe(row)`; the rows go to $OUT/`name`."""
    rows = []
    for case in cases:
        rows.append(run(*case))
        print(describe(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(rows, f, indent=1)


def main():
    run_cases(CASES, run, lambda r: (
        f"{r['operator']} B={r['batch']} {r['context']} budget {r['budget']} ({r['splits']} splits, "
        f"{r['merge_plan']}): step {r['shipped_step_us']:.1f} us shipped vs {r['one_tile_step_us']:.1f} one tile; "
        f"merge kernel {r['shipped_merge_kernel_us']:.1f} vs {r['one_tile_merge_kernel_us']:.1f} us; "
        f"max diff {r['max_abs_diff']:.2e}"), "merge_ab.json")


if __name__ == "__main__":
    main()
