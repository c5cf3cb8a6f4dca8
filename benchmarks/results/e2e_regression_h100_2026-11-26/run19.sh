#!/usr/bin/env bash
# after the index-write fix: index-write bench, then the e2e table (dense, asynctls 2048/1024), dummy weights
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
mkdir -p /tmp/s && ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
O=$OUT/e2e; mkdir -p $O
E="python3 benchmarks/bench_vllm_e2e.py"
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
date
timeout 230 $E --stage dense --out $O 2>&1 | grep -v -E "$F" | tail -3
date
timeout 330 $E --stage asynctls --out $O 2>&1 | grep -v -E "$F" | tail -3
date
$E --stage report --out $O
