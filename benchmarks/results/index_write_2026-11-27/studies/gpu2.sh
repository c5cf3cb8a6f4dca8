#!/usr/bin/env bash
# GPU machine, call 2 (stages the kit's second part on the side): every compiled kernel test at this code, then
# DeepSeek-V3's 128 heads through the GLM sweep (the block scorer's stages). Writes $OUT.
export PYTHONUNBUFFERED=1
bash .vllm-gpu/p2/install.sh .vllm-gpu/p2 > /dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
pip install -q --no-deps --target /tmp/pyt .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/pyt:$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 360 python3 -m pytest tests/test_triton_kernels.py \
  -m gpu -q --noconftest -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_tests.log
HEADS=128 BATCH=8 timeout 200 python3 benchmarks/results/mla_stages_2026-11-27/studies/glm_sweep.py 2>&1 \
  | grep -v "Warning\|warn_once" | tail -30 | tee $OUT/glm128.log
