#!/usr/bin/env bash
# GPU machine (no vLLM needed): the wide plan's tests compiled (several tiles per split, several head blocks,
# the plan rule). Writes $OUT/gpu_tests.log.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
pip install -q --target /tmp/pyt .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/pyt:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu \
  -q --noconftest -p no:cacheprovider -k "${TESTS_K:-several_tiles or wide_value or several_head_blocks}" 2>&1 \
  | tail -5 | tee $OUT/gpu_tests.log
