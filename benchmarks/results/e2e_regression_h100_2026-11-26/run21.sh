#!/usr/bin/env bash
# after the fix: vLLM correctness check (asynctls covering budget vs FLASH_ATTN), then 64K with random weights
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
E="python3 benchmarks/bench_vllm_e2e.py"
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
date
timeout 200 $E --stage check --runs asynctls_cover,flash_attn,asynctls_256 --time-budget 190 --out $OUT/check 2>&1 | grep -v -E "$F" | tail -40
date
O=$OUT/e2e_random; mkdir -p $O
timeout 230 $E --stage dense --contexts 65536 --weights random --out $O 2>&1 | grep -v -E "$F" | tail -2
date
timeout 150 $E --stage asynctls --budgets 2048 --contexts 65536 --weights random --out $O 2>&1 | grep -v -E "$F" | tail -2
$E --stage report --out $O
date
