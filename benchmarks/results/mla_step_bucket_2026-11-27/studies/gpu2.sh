#!/usr/bin/env bash
# GPU machine, call 2 (carry .whl and .vllm-gpu/p2): stage the kit's second part, then the compiled warm-up,
# index-write and attention tests. Writes $OUT.
export PYTHONUNBUFFERED=1
bash .vllm-gpu/p2/install.sh .vllm-gpu/p2 | tail -1
python3 -c "import pytest" 2>/dev/null || { pip install -q --target /tmp/pyt .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/pyt; }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 400 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest \
  -p no:cacheprovider -k "warm or write or sparse_attention or mla_backend" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
