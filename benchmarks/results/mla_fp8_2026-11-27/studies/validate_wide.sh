#!/usr/bin/env bash
# GPU machine (no vLLM needed): every compiled kernel test, then the MLA operator profile (B=16, 32K and 64K,
# bf16 / fp8, standard / lagged) with the wide-row attention plan. Writes $OUT.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
pip install -q --target /tmp/pyt .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/pyt:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu \
  -q --noconftest -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_tests.log
CONTEXTS="${CONTEXTS:-32768 65536}" bash benchmarks/results/mla_fp8_2026-11-27/studies/profile_mla.sh 2>&1 \
  | grep "whole step\|copy bandwidth\|_kernel\|index write" | grep -v Warning
