#!/usr/bin/env bash
# GPU machine, call 6 (carry .baseline_kernels, .whl): the claim kernels with the stored summary loaded after
# their scan again (as in f28640d) against f28640d (prefill_write_ab.py), the compiled write tests, then the
# compiled kernel tests call 1's limit cut (the 314th on, in collection order). Writes $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
OUT=$OUT timeout 100 python3 benchmarks/results/index_write_2026-11-27/studies/prefill_write_ab.py 2>&1 \
  | grep -v "Warning\|warn_once" | tee $OUT/prefill_write_ab.log
P="python3 -m pytest --noconftest -p no:cacheprovider -q"
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
timeout 120 $P tests/test_triton_kernels.py -m gpu -k "write_index or key_tail" 2>&1 | tail -3 | tee $OUT/gpu_tests_write.log
$P tests/test_triton_kernels.py -m gpu --collect-only 2>/dev/null | grep "::" > /tmp/all.txt
echo "collected $(wc -l < /tmp/all.txt)" | tee $OUT/gpu_tests_rest.log
timeout 200 $P $(tail -n +314 /tmp/all.txt) 2>&1 | tail -4 | tee -a $OUT/gpu_tests_rest.log
