#!/usr/bin/env bash
# GPU machine, call 3: the wide MLA attention plan past one head block and past the long splits' threshold,
# A/B in one run (attn_ab.py), then the compiled tests it touches (the wide plan, MLA cases, the new
# DeepSeek-V3-style case). Writes $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
OUT=$OUT timeout 300 python3 benchmarks/results/index_write_2026-11-27/studies/attn_ab.py 2>&1 \
  | grep -v "Warning\|warn_once" | tee $OUT/attn_ab.log
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 280 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest \
  -p no:cacheprovider -k "wide or mla or dsv3 or glm" 2>&1 | tail -8 | tee $OUT/gpu_tests.log
