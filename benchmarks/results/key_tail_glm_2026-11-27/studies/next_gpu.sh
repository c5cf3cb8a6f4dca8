#!/usr/bin/env bash
# Prepared 2026-11-27 for the next session's first device call (carry .whl and .vllm-gpu/p1; no vLLM yet): the
# compiled write tests at the final code (warm_write_index and the key-tail tests compiled for the first time) and
# how long the warm-up takes with a cold and a warm Triton cache. Then, on the same warm machine: stage p2
# (`bash .vllm-gpu/p2/install.sh .vllm-gpu/p2`), and `bash benchmarks/results/key_tail_glm_2026-11-27/studies/tput.sh
# asynctls 32768 3` (carry p3): its logs must hold no `jit_monitor` warning for the plugin's kernels
# (`grep jit_monitor $OUT/t/logs.tail`). Writes $OUT.
export PYTHONUNBUFFERED=1
bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
S=benchmarks/results/key_tail_glm_2026-11-27/studies
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 200 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest \
  -p no:cacheprovider -k "write_index or key_tail or warm" 2>&1 | tail -4 | tee $OUT/gpu_tests_write.log
export TRITON_CACHE_DIR=$(mktemp -d)
OUT=$OUT timeout 200 python3 $S/warm_time.py cold 2>&1 | grep -v "Warning\|warn_once" | tee $OUT/warm_time.log
OUT=$OUT timeout 100 python3 $S/warm_time.py warm 2>&1 | grep -v "Warning\|warn_once" | tee -a $OUT/warm_time.log
