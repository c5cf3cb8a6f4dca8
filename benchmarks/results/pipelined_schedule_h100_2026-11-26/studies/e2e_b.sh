#!/usr/bin/env bash
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
O=$OUT/e2e; mkdir -p $O
cp -r $1/* $O/ 2>/dev/null
E="python3 benchmarks/bench_vllm_e2e.py"
date
timeout 160 $E --stage asynctls --budgets 2048 --contexts 65536 --out $O 2>&1 | grep -v -E "$F" | tail -2
date
timeout 200 $E --stage check --runs asynctls_cover_lagged,flash_attn,asynctls_cover --out $O/check 2>&1 | grep -v -E "$F" | tail -6
date
$E --stage report --out $O
