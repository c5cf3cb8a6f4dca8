#!/usr/bin/env bash
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
O=$OUT/e2e_random; mkdir -p $O; cp .baseline_kernels/e2e_random/tput_dense.json $O/
E="python3 benchmarks/bench_vllm_e2e.py"
date
timeout 250 $E --stage asynctls --budgets 2048 --contexts 65536 --weights random --out $O 2>&1 | grep -v -E "$F" | tail -2
$E --stage report --out $O
date
unset PYTHONPATH
bash .baseline_kernels/run22.sh
date
