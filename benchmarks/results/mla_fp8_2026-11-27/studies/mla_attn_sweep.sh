#!/usr/bin/env bash
# GPU machine (no vLLM needed): the MLA attention launch sweep (mla_attn_sweep.py); writes $OUT.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
python3 benchmarks/results/mla_fp8_2026-11-27/studies/mla_attn_sweep.py 2>&1 | grep -v "Warning\|warn_once"
