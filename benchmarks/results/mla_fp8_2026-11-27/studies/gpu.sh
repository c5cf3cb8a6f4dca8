#!/usr/bin/env bash
# GPU machine, after the kit's first two calls (bash .vllm-gpu/pN/install.sh .vllm-gpu/pN, N = 1, 2; carry
# .vllm-gpu/p3 and .whl here): installs the kit's last part and the project, optionally runs the compiled
# GPU kernel tests (all of them), then the real-vLLM check runs RUNS into /tmp/chk, shared by the calls
# of one warm machine (runs of an earlier call serve as references). Copies logs and summaries to $OUT/TAG.
# usage: bash benchmarks/results/mla_fp8_2026-11-27/studies/gpu.sh TAG RUNS [TIME_BUDGET_S] [tests]
TAG=$1; RUNS=$2; TIME=${3:-400}; TESTS=$4
mkdir -p $OUT/$TAG /tmp/chk
if [ ! -f /tmp/site/vllm/__init__.py ]; then bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1; fi
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/$TAG/device.txt
if [ "$TESTS" = tests ]; then
  pip install -q --target /tmp/pyt .whl/*.whl >/dev/null 2>&1
  PYTHONPATH=/tmp/pyt:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu \
    -q --noconftest -p no:cacheprovider 2>&1 | tail -12 | tee $OUT/$TAG/gpu_tests.log
fi
[ -n "$RUNS" ] || exit 0
python3 benchmarks/bench_vllm_e2e.py --stage check --runs "$RUNS" --time-budget "$TIME" --out /tmp/chk 2>&1 | tail -80
cp /tmp/chk/check_summary*.json $OUT/$TAG/ 2>/dev/null
for f in /tmp/chk/check_*.log; do tail -c 4000 "$f" > "$OUT/$TAG/$(basename "$f").tail"; done
exit 0
