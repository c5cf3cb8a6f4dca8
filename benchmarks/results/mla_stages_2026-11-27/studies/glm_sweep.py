"""GLM-style MLA (20 heads on one latent kv head, so 32 heads per program) launch sweep (GPU, no vLLM). Before
it the wide-row attention plan and the block scorer's wide-key plan stopped at 16 heads per program (nothing
above was measured); after it (2026-11-27) both apply up to 32. At B=16 and latent 576 / 512: (1) the
attention split + merge over 2,176 positions per sequence, each setting (one split of tiles x BLOCK_N x warps
x stages) checked against the shipped plan; (2) the whole operator step at 32K with the block scorer's
settings varied (the wide rule turned off for them so the module constants apply; the baseline is the
shipped plan), positions compared with the shipped step's. `HEADS=128` in the environment (prepared, not
yet run) sweeps DeepSeek-V3's 128 heads instead (4 head blocks: the wide plans do not apply there; the block
scorer's stages alone), at batch `BATCH` (default 16). Writes $OUT/glm_sweep.json
(glm_sweep_{HEADS}_b{BATCH}.json for other settings)."""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "mla_fp8_2026-11-27", "studies"))
sys.path.insert(0, HERE)
import mla_attn_sweep as attn  # noqa: E402
import mla_stage_sweep as stage  # noqa: E402

from asynctls_tip_kernels import block_select  # noqa: E402

HEADS = int(os.environ.get("HEADS", 20))
BATCH = int(os.environ.get("BATCH", 16))


def main():
    attn.H = HEADS
    rows = [dict(part="attention", **attn.run(BATCH, False, None))]
    print(rows[-1], flush=True)
    for setting in itertools.product((1,), (32, 64), (4, 8), (2, 3, 4)):
        rows.append(dict(part="attention", **attn.run(BATCH, False, setting)))
        r = rows[-1]
        print(f"attention {setting}: {r.get('us', float('nan')):.1f} us err {r.get('max_err_vs_shipped')} "
              f"{r.get('error', '')[:80]}", flush=True)
    stage.H, stage.B = HEADS, BATCH
    stage.FAMILIES.pop("token")
    # Above 32 heads per program the block scorer's plan reads only BLOCK_SCORE_STAGES (its tile, chunk and
    # warps are fixed): vary the stages alone there. mla_stage_sweep turns the wide-key rule off while the block
    # family runs, so the module constants apply.
    grid = (list(itertools.product((32, 64, 128), (64,), (2, 3, 4), (4, 8))) if HEADS <= 32 else
            [(block_select.BLOCK_SCORE_TILE, block_select.BLOCK_SCORE_DK, s, block_select.BLOCK_SCORE_WARPS)
             for s in (2, 3, 4)])
    stage.FAMILIES["block"] = (block_select, stage.FAMILIES["block"][1], grid)
    rows += [dict(part="step", **r) for r in stage.sweep_context(32768)]
    name = "glm_sweep.json" if (HEADS, BATCH) == (20, 16) else f"glm_sweep_{HEADS}_b{BATCH}.json"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), heads=HEADS, batch=BATCH, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
