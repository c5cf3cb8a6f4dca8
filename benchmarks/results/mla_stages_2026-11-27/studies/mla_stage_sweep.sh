#!/usr/bin/env bash
# GPU machine (no vLLM needed): the MLA selection-stage launch sweep (mla_stage_sweep.py; run 2026-11-27);
# writes $OUT/mla_stage_sweep.json.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
python3 benchmarks/results/mla_stages_2026-11-27/studies/mla_stage_sweep.py 2>&1 | grep -v "Warning\|warn_once"
