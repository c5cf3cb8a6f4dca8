#!/usr/bin/env bash
# e2e in vLLM at 64K with the pipelined step's new schedule: dense, lagged (call A); asynctls + lagged check (call B)
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
O=$OUT/e2e; mkdir -p $O
E="python3 benchmarks/bench_vllm_e2e.py"
date
timeout 160 $E --stage dense --contexts 65536 --out $O 2>&1 | grep -v -E "$F" | tail -2
date
timeout 160 $E --stage asynctls --budgets 2048 --contexts 65536 --lagged --out $O 2>&1 | grep -v -E "$F" | tail -2
date
$E --stage report --out $O
