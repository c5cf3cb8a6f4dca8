#!/usr/bin/env bash
# Real vLLM 0.26 on the GPU with PDL on (trigger at the end of each kernel's main loop): correctness
# check against FLASH_ATTN and 64K decode throughput of asynctls (part A); dense, lagged and the
# lagged check (part B). The vLLM kit (.vllm-gpu/p1, p2) must be staged first.
PART=$1
if [ "$PART" = A ]; then
  bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
fi
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
O=$OUT/e2e; mkdir -p $O
E="python3 benchmarks/bench_vllm_e2e.py"
if [ "$PART" = A ]; then
  date
  timeout 200 $E --stage check --runs asynctls_cover,asynctls_cover_lagged,flash_attn --out $O/check 2>&1 | grep -v -E "$F" | tail -6
  date
  timeout 160 $E --stage asynctls --budgets 2048 --contexts 65536 --out $O 2>&1 | grep -v -E "$F" | tail -2
  date
else
  timeout 170 $E --stage dense --contexts 65536 --out $O 2>&1 | grep -v -E "$F" | tail -2
  date
  timeout 160 $E --stage asynctls --budgets 2048 --contexts 65536 --lagged --out $O 2>&1 | grep -v -E "$F" | tail -2
  date
  timeout 240 $E --stage check --runs asynctls_cover_lagged,flash_attn --out $O/check 2>&1 | grep -v -E "$F" | tail -12
  date
fi
$E --stage report --out $O
