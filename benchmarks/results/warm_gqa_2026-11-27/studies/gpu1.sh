#!/usr/bin/env bash
# GPU machine, call 1 (carry .whl and .vllm-gpu/p1): stage the vLLM kit's first part, the compiled warm-up tests
# (`warm_decode_attention`, `warm_write_index`) and the attention tests, then how long the attention warm-up takes
# with a cold and a warm Triton cache. Writes $OUT.
export PYTHONUNBUFFERED=1
bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
S=benchmarks/results/warm_gqa_2026-11-27/studies
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 240 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest \
  -p no:cacheprovider -k "warm or sparse_attention" 2>&1 | tail -4 | tee $OUT/gpu_tests_warm.log
export TRITON_CACHE_DIR=$(mktemp -d)
OUT=$OUT timeout 200 python3 $S/warm_attention_time.py cold 2>&1 | grep -v "Warning\|warn_once" | tee $OUT/warm_attention.log
OUT=$OUT timeout 100 python3 $S/warm_attention_time.py warm 2>&1 | grep -v "Warning\|warn_once" | tee -a $OUT/warm_attention.log
