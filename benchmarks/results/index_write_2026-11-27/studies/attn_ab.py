"""The MLA attention's wide plan past one head block and past the long splits' threshold (GPU, no vLLM): the
shipped rule (`sparse_attention.ATTN_WIDE_MAX_HEAD_BLOCKS` = 4, `ATTN_WIDE_LONG_MAX_GROUPS`) against the rule
before it (one head block, never where the long splits apply: the two constants at 1 and 0) in one run, MLA
latent 576 / 512 at 32K, budget 2048, blocks of 64 x 128: the whole operator step from a CUDA graph, the split
+ merge kernels' eager device time, each plan, and the largest output difference. Writes $OUT/attn_ab.json.

Recorded (2026-11-27, `../attn_ab/`): `attn_ab.json` ran the first five cases with the groups limit at 32 (128
heads at B=16, 64 groups, the unchanged control); `attn_ab_more_groups.json` the next five with the limit
lifted, which set it to 128. Run as it is now, 128 heads at B=48 (192 groups) is the control."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_ab import build_step, graph_time_ms, kernel_times_us, run_cases  # noqa: E402

from asynctls_tip_kernels import sparse_attention as sa  # noqa: E402

CASES = [(128, 1), (128, 8), (16, 32), (20, 32), (128, 16), (16, 64), (20, 64), (16, 128), (128, 32),
         (128, 48)]  # (heads, batch)


def run(heads, B):
    step, shapes = build_step("mla", B, 32768, 2048, heads=heads)
    row = dict(device=torch.cuda.get_device_name(), heads=heads, batch=B, context=32768, budget=2048)
    saved = sa.ATTN_WIDE_MAX_HEAD_BLOCKS, sa.ATTN_WIDE_LONG_MAX_GROUPS
    outs = {}
    for name, consts in (("shipped", saved), ("before", (1, 0))):
        sa.ATTN_WIDE_MAX_HEAD_BLOCKS, sa.ATTN_WIDE_LONG_MAX_GROUPS = consts
        try:
            plan = sa.attention_plan(*shapes)
            row[f"{name}_plan"] = {k: plan[k] for k in ("BLOCK_N", "SPLIT_LEN", "NUM_SPLITS", "head_blocks",
                                                        "num_warps", "num_stages")}
            outs[name] = step()[0].float().clone()
            row[f"{name}_step_us"] = graph_time_ms(step) * 1e3
            row[f"{name}_attention_kernels_us"] = sum(us for k, us in kernel_times_us(step).items()
                                                      if "_sparse_attn_" in k)
        finally:
            sa.ATTN_WIDE_MAX_HEAD_BLOCKS, sa.ATTN_WIDE_LONG_MAX_GROUPS = saved
    row["max_abs_diff"] = float((outs["shipped"] - outs["before"]).abs().max())
    return row


def main():
    run_cases(CASES, run, lambda r: (
        f"MLA {r['heads']} heads B={r['batch']}: step {r['before_step_us']:.1f} -> {r['shipped_step_us']:.1f} us, "
        f"split + merge {r['before_attention_kernels_us']:.1f} -> {r['shipped_attention_kernels_us']:.1f} us; "
        f"plans {r['before_plan']} -> {r['shipped_plan']}; max diff {r['max_abs_diff']:.2e}"), "attn_ab.json")


if __name__ == "__main__":
    main()
