#!/usr/bin/env bash
# GPU machine, after the kit's first two calls (carry .vllm-gpu/p3 and .whl): installs the kit's last part
# and the project, then `vllm serve` (benchmarks/run_gpu_serve_check.sh) on an fp8 KV cache for the tiny
# Qwen3 (GQA) and the 4-layer DeepSeek-V3-shaped check model (MLA). SPECS picks (default "GQA MLA"). Logs and results under $OUT/serve_{gqa,mla}_fp8.
if [ ! -f /tmp/site/vllm/__init__.py ]; then bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1; fi
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
ROOT=$OUT
for spec in ${SPECS:-GQA MLA}; do
  tag=${spec,,}
  OUT=$ROOT/serve_${tag}_fp8 SERVE_SPEC=$spec timeout 280 bash benchmarks/run_gpu_serve_check.sh --kv-cache-dtype fp8 \
    2>&1 | tail -20
  echo "== $spec rc=${PIPESTATUS[0]}"
done
