#!/usr/bin/env bash
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
SITE=/tmp/s; mkdir -p $SITE /tmp/pyt
ln -sfn $PWD/kernels $SITE/asynctls_tip_kernels
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/pyt:$SITE:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 150 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
tail -2 $OUT/gpu_tests.log; grep FAILED $OUT/gpu_tests.log | head
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
E="python3 benchmarks/bench_vllm_e2e.py"
date
timeout 200 $E --stage check --runs asynctls_cover_lagged,flash_attn --time-budget 190 --out $OUT/check 2>&1 | grep -v -E "$F" | tail -16
O=$OUT/e2e_lagged; mkdir -p $O; cp .baseline_kernels/e2e_dense/tput_dense.json $O/
date
timeout 170 $E --stage asynctls --budgets 2048 --contexts 65536 --lagged --out $O 2>&1 | grep -v -E "$F" | tail -1
$E --stage report --out $O | tail -1
date
