"""The MLA token scorer's launch constants (`token_select.TOKEN_SCORE_TILE` x `TOKEN_SCORE_WARPS`) at GLM-style
20 heads (padded to 32 rows in its tensor-core dot), B=16, 32K, budget 2048, blocks of 64 x 128: the whole
operator step from a CUDA graph per setting, positions compared with the shipped step's (GPU, no vLLM). The
16-head sweep of 2026-11-27 left the shipped 128 x 4 within 1-2 us of the best; at 20 heads the scorer is the
step's largest kernel (28.6 us against 19.3 at 16). `HEADS` in the environment picks another head count.
Writes $OUT/token_sweep_{HEADS}.json."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "mla_stages_2026-11-27",
                                "studies"))
import mla_stage_sweep as stage  # noqa: E402

HEADS = int(os.environ.get("HEADS", 20))


def main():
    stage.H = HEADS
    stage.FAMILIES.pop("block")
    rows = stage.sweep_context(32768)
    with open(os.path.join(os.environ.get("OUT", "."), f"token_sweep_{HEADS}.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), heads=HEADS, batch=stage.B, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
