"""MLA selection-stage launch sweep (GPU, no vLLM). Prepared 2026-11-27 (seventeenth session), run in the
eighteenth (`../stage_sweep/`): the block scorer's winner shipped as `block_select.BLOCK_SCORE_WIDE_*`. The next
step after the attention sweep (`mla_fp8_2026-11-27/studies/mla_attn_sweep.py`), aimed at the block scorer
(16-19 us per layer at B=16 for 9-19 MB of summaries) and the token scorer (19.4 us for 8.4 MB of codes), both latency-bound.

The operator step at DeepSeek-V2-Lite latent (576 / 512), 16 heads, B=16, budget 2048, blocks of 64 x 128,
the standard step (the block stage on the critical path), 32K and 64K: for each setting of the module
constants `block_select.BLOCK_SCORE_{TILE,DK,STAGES,WARPS}` and `token_select.TOKEN_SCORE_{TILE,WARPS}`
(one family varied at a time, the other at its shipped values), the step from a CUDA graph, the share of
positions equal to the shipped settings' (float32 summation order may swap near-ties) and the kernel
times. These constants are shared with GQA: a winning setting ships as an MLA-shape rule, as the
attention's `ATTN_WIDE_*` did. Writes $OUT/mla_stage_sweep.json.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "benchmarks"))
from bench_sparse_decode import MLA, graph_time_ms, paged_case  # noqa: E402
from profile_sparse_decode import kernel_times_us  # noqa: E402

from asynctls_tip_kernels import block_select, token_select  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton  # noqa: E402

assert block_select.__file__.endswith("kernels/block_select.py"), block_select.__file__  # this tree's kernels
B, H = 16, 16
DK, DV = MLA["kv_lora_rank"] + MLA["rope_dim"], MLA["kv_lora_rank"]
FAMILIES = {
    "block": (block_select, ("BLOCK_SCORE_TILE", "BLOCK_SCORE_DK", "BLOCK_SCORE_STAGES", "BLOCK_SCORE_WARPS"),
              list(itertools.product((32, 64, 128), (64, 128), (2, 3, 4), (4, 8)))),
    "token": (token_select, ("TOKEN_SCORE_TILE", "TOKEN_SCORE_WARPS"),
              list(itertools.product((32, 64, 128, 256), (2, 4, 8)))),
}


def sweep_context(context: int) -> list[dict]:
    config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = paged_case(B, context, H, 1, DK, DV, config, mla=True, seed=1)
    ws = SparseDecodeWorkspace(B, H, 1, DK, DV, table.shape[1], kc.shape[1], config, q.dtype, "cuda")
    scale = 1.0 / math.sqrt(192)

    def step():
        return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=ws)

    want_pos = step()[1].clone()
    rows = [dict(context=context, setting="shipped", us=graph_time_ms(step) * 1e3, kernels_us=kernel_times_us(step))]
    print(f"{context}: shipped {rows[-1]['us']:.1f} us", flush=True)
    for family, (module, names, grid) in FAMILIES.items():
        # Since the block scorer's wide-key plan shipped, MLA keys take BLOCK_SCORE_WIDE_*: turn that rule off
        # while the block family varies the module constants (the baseline above stays the shipped plan).
        if family == "block":
            shipped_min_dk, block_select.BLOCK_SCORE_WIDE_MIN_DK = block_select.BLOCK_SCORE_WIDE_MIN_DK, 1 << 30
        shipped = {n: getattr(module, n) for n in names}
        for values in grid:
            setting = dict(zip(names, values))
            for n, v in setting.items():
                setattr(module, n, v)
            try:
                got_pos = step()[1]
                row = dict(context=context, family=family, setting=setting, us=graph_time_ms(step) * 1e3,
                           positions_equal=float((got_pos == want_pos).float().mean()))
            except Exception as e:  # settings past registers or shared memory: recorded, skipped
                row = dict(context=context, family=family, setting=setting, error=f"{type(e).__name__}: {e}"[:200])
            finally:
                for n, v in shipped.items():
                    setattr(module, n, v)
            rows.append(row)
            print(f"{context} {family} {values}: {row.get('us', float('nan')):.1f} us, equal positions "
                  f"{row.get('positions_equal')} {row.get('error', '')[:60]}", flush=True)
        if family == "block":
            block_select.BLOCK_SCORE_WIDE_MIN_DK = shipped_min_dk
    return rows


def main():
    out = os.environ.get("OUT", ".")
    rows = []
    for context in (32768, 65536):
        rows += sweep_context(context)
        torch.cuda.empty_cache()
    with open(os.path.join(out, "mla_stage_sweep.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
