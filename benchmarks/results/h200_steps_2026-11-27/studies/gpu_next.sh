#!/usr/bin/env bash
# For the next GPU session (no vLLM needed; written 2026-11-27, not yet run): the MLA split that reads each
# latent row once, the wide plan at 8 warps (`split_regs.py`: twice the resident warps with one tile per split),
# then the token scorer's tile at large batches. Writes $OUT.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
cd benchmarks
python3 results/h200_steps_2026-11-27/studies/mla_split_variants.py 2>&1 | grep -v "Warning\|warn_once"
CASES="16:16 16:64 16:136 20:136" TILES="1 2 4" WARPS="4 8" NAME=wide_warps \
  python3 results/h200_steps_2026-11-27/studies/wide_split_sweep.py 2>&1 | grep -v "Warning\|warn_once"
python3 results/h200_steps_2026-11-27/studies/mla_token_tile_sweep.py 2>&1 | grep -v "Warning\|warn_once"
