#!/usr/bin/env bash
# GPU kernel tests; trace of the fixed code; e2e at 64K with random weights
cd "$(dirname "$0")/.."
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
SITE=/tmp/s; mkdir -p $SITE /tmp/pyt
ln -sfn $PWD/kernels $SITE/asynctls_tip_kernels
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/pyt:$SITE PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 200 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
tail -2 $OUT/gpu_tests.log; grep FAILED $OUT/gpu_tests.log | head
PYTHONPATH=$SITE:$PYTHONPATH timeout 100 python3 .baseline_kernels/iw_bench.py 2>&1 | grep "^(."
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
date
TRITON_CACHE_DIR=/tmp/tc_fix timeout 150 python3 benchmarks/trace_vllm_decode_steps.py --context 65536 --requests 5 --out $OUT/trace --label fixed 2>&1 | grep -v -E "$F" | tail -5
date
O=$OUT/e2e_random; mkdir -p $O
E="python3 benchmarks/bench_vllm_e2e.py"
timeout 150 $E --stage dense --contexts 65536 --weights random --out $O 2>&1 | grep -v -E "$F" | tail -2
timeout 150 $E --stage asynctls --budgets 2048 --contexts 65536 --weights random --out $O 2>&1 | grep -v -E "$F" | tail -2
$E --stage report --out $O
date
