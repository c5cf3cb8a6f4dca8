#!/usr/bin/env bash
cd "$(dirname "$0")/.."
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
SITE=/tmp/s; mkdir -p $SITE /tmp/pyt
ln -sfn $PWD/kernels $SITE/asynctls_tip_kernels
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/pyt:$SITE:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 200 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
tail -2 $OUT/gpu_tests.log; grep FAILED $OUT/gpu_tests.log | head
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
date
timeout 330 python3 benchmarks/bench_vllm_e2e.py --stage check --runs asynctls_cover_lagged,flash_attn --time-budget 320 --out $OUT/check 2>&1 | grep -v -E "$F" | tail -25
date
