#!/usr/bin/env bash
# Prepared 2026-11-27 for the next session's first device call (carry .baseline_kernels and .whl; no vLLM): the
# claim kernels' prefill writes after the refactor against f28640d's, every compiled kernel test at the final
# code (this session's last subset run was cut by the call's limit), and the MLA profiles at 16 / 20 / 128
# heads. Writes $OUT.
export PYTHONUNBUFFERED=1
S=benchmarks/results/index_write_2026-11-27/studies
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
timeout 150 python3 $S/prefill_write_ab.py 2>&1 | grep -v "Warning\|warn_once" | tee $OUT/prefill_write_ab.log
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 300 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest \
  -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_tests.log
for h in 16 20 128; do
  timeout 90 python3 benchmarks/profile_sparse_decode.py --mla --heads $h --batch 16 --context 32768 2>&1 \
    | grep -v "Warning\|warn_once" | tee -a $OUT/profiles.log
done
