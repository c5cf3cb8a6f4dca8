#!/usr/bin/env bash
# GPU machine (no vLLM needed): the block scorer's wide-key plan, compiled (every block-stage and whole-operator
# test), the MLA operator profile with it, and where the MLA index write's time goes. Writes $OUT.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
pip install -q --target /tmp/pyt .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/pyt:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu \
  -q --noconftest -p no:cacheprovider -k "${TESTS_K:-block or mla or decode or wide}" 2>&1 | tail -5 | tee $OUT/gpu_tests.log
python3 benchmarks/results/mla_stages_2026-11-27/studies/index_write_study.py 2>&1 | grep -v "Warning\|warn_once"
mkdir -p $OUT/profile_mla
CONTEXTS="${CONTEXTS:-32768 65536}" bash benchmarks/results/mla_fp8_2026-11-27/studies/profile_mla.sh 2>&1 \
  | grep "whole step\|copy bandwidth\|_kernel\|index write" | grep -v Warning
