#!/usr/bin/env bash
# GPU machine (no vLLM needed): the wide plan's tiles per split at large batches. Writes $OUT.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
cd benchmarks && python3 results/h200_steps_2026-11-27/studies/wide_split_sweep.py 2>&1 | grep -v "Warning\|warn_once"
