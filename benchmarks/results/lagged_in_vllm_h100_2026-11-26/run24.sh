#!/usr/bin/env bash
# lagged selection in vLLM: 64K throughput, standard vs lagged, same session (dense from this morning's run for the KV bytes)
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
O=$OUT/e2e_lagged; mkdir -p $O; cp .baseline_kernels/e2e_dense/tput_dense.json $O/
E="python3 benchmarks/bench_vllm_e2e.py"
date
timeout 170 $E --stage asynctls --budgets 2048 --contexts 65536 --out $O 2>&1 | grep -v -E "$F" | tail -2
date
timeout 200 $E --stage asynctls --budgets 2048 --contexts 65536 --lagged --out $O 2>&1 | grep -v -E "$F" | tail -2
$E --stage report --out $O
grep -v -E "$F" $O/tput_asynctls_2048_lagged.log | tail -5
date
