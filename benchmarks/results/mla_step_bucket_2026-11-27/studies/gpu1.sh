#!/usr/bin/env bash
# GPU machine, call 1 (carry .whl and .vllm-gpu/p1): stage the vLLM kit's first part, then the A/B of the
# attention plan from the batch against the plan of the next power of two (plan_bucket_ab.py). Writes $OUT.
export PYTHONUNBUFFERED=1
bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
OUT=$OUT timeout 420 python3 benchmarks/results/mla_step_bucket_2026-11-27/studies/plan_bucket_ab.py 2>&1 \
  | grep -v "Warning\|warn_once" | tee $OUT/plan_bucket_ab.log | tail -40
