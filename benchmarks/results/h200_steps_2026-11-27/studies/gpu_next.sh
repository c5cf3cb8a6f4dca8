#!/usr/bin/env bash
# For the next GPU session (no vLLM needed; written 2026-11-27, not yet run): the MLA split that reads each
# latent row once, then the token scorer's tile at large batches. Writes $OUT.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
cd benchmarks
python3 results/h200_steps_2026-11-27/studies/mla_split_variants.py 2>&1 | grep -v "Warning\|warn_once"
python3 results/h200_steps_2026-11-27/studies/mla_token_tile_sweep.py 2>&1 | grep -v "Warning\|warn_once"
