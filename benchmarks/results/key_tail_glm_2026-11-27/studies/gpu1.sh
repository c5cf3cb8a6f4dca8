#!/usr/bin/env bash
# GPU machine, call 1 (carry .baseline_kernels, .whl, .vllm-gpu/p1): stage the vLLM kit's first part, then the
# MLA write with the key tail against the joined key (tail_ab.py), last session's prepared claim-kernel prefill
# A/B (prefill_write_ab.py), and every compiled kernel test at this code. Writes $OUT.
export PYTHONUNBUFFERED=1
bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
S=benchmarks/results/key_tail_glm_2026-11-27/studies
OUT=$OUT timeout 120 python3 $S/tail_ab.py 2>&1 | grep -v "Warning\|warn_once" | tee $OUT/tail_ab.log
OUT=$OUT timeout 120 python3 benchmarks/results/index_write_2026-11-27/studies/prefill_write_ab.py 2>&1 \
  | grep -v "Warning\|warn_once" | tee $OUT/prefill_write_ab.log
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 320 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest \
  -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_tests.log
