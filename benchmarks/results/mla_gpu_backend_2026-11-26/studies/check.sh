#!/usr/bin/env bash
# GPU machine, third kit call: install vLLM 0.26 (kit), then the MLA GPU backend's compiled kernel-level
# test and the real-vLLM check of MLA runs (bench_vllm_e2e.py --stage check). Writes summaries to $OUT.
# usage: bash benchmarks/results/mla_gpu_backend_2026-11-26/studies/check.sh RUNS [TIME_BUDGET_S]
RUNS=${1:-mla_triton,mla_asynctls_cover,mla_asynctls_256,mla_asynctls_cover_lagged,mla_default,mla_asynctls_cover_eager}
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
pip install -q --target /tmp/pyt .whl/*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/pyt:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu \
  -q --noconftest -p no:cacheprovider -k gpu_mla_backend 2>&1 | tail -5 | tee $OUT/gpu_mla_tests.log
python3 benchmarks/bench_vllm_e2e.py --stage check --runs "$RUNS" --time-budget "${2:-400}" --out /tmp/chk 2>&1 | tail -80
cp /tmp/chk/check_summary*.json $OUT/ 2>/dev/null
for f in /tmp/chk/check_*.log; do tail -c 4000 "$f" > "$OUT/$(basename "$f").tail"; done
