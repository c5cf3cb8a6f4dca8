#!/usr/bin/env bash
# GPU machine, call 4: the one-pass index write's launch settings (write_ab.py), then the compiled index write
# tests. Writes $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 200 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest \
  -p no:cacheprovider -k "write_index or graph_captured_before" 2>&1 | tail -6 | tee $OUT/gpu_tests_write.log
timeout 240 python3 benchmarks/results/index_write_2026-11-27/studies/write_ab.py 2>&1 \
  | grep -v "Warning\|warn_once" | tee $OUT/write_ab.log
