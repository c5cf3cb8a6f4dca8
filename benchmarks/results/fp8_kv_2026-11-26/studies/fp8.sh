#!/usr/bin/env bash
# GPU machine, after the kit's first two calls (bash .vllm-gpu/pN/install.sh .vllm-gpu/pN, N = 1, 2; carry
# .vllm-gpu/p3 and .whl here). `check RUNS [TIME]`: the compiled fp8 kernel tests, then the real-vLLM check
# runs RUNS. `tput CONTEXTS`: decode throughput with --kv-cache-dtype fp8 for both backends (Qwen3-8B
# shapes, dummy weights, budget 2048, 2 repeats), dense then asynctls, then the report. Writes to $OUT.
set -o pipefail
WHAT=$1
if [ ! -f /tmp/site/vllm/__init__.py ]; then bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1; fi
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
if [ "$WHAT" = check ]; then
  pip install -q --target /tmp/pyt .whl/*.whl >/dev/null 2>&1
  PYTHONPATH=/tmp/pyt:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu \
    -q --noconftest -p no:cacheprovider -k fp8 2>&1 | tail -8 | tee $OUT/gpu_tests_fp8.log
  python3 benchmarks/bench_vllm_e2e.py --stage check --runs "$2" --time-budget "${3:-330}" --out /tmp/chk_fp8 2>&1 | tail -40
  cp /tmp/chk_fp8/check_summary*.json $OUT/ 2>/dev/null
  for f in /tmp/chk_fp8/check_*.log; do tail -c 4000 "$f" > "$OUT/$(basename "$f").tail"; done
else
  for stage in dense asynctls; do
    python3 benchmarks/bench_vllm_e2e.py --stage $stage --kv-cache-dtype fp8 --contexts "${2:-65536}" --budgets 2048 \
      --repeats 2 --out /tmp/tput_fp8 2>&1 | tail -8
  done
  cp /tmp/tput_fp8/tput_*.json $OUT/ 2>/dev/null
  for f in /tmp/tput_fp8/tput_*.log; do tail -c 5000 "$f" > "$OUT/$(basename "$f").tail"; done
  python3 benchmarks/bench_vllm_e2e.py --stage report --out /tmp/tput_fp8 | tee $OUT/report.md
fi
exit 0
