#!/usr/bin/env bash
# e2e regression: per-step decode trace in vLLM, HEAD vs 7e07c93 (5 requests each), then the conditions bench
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
T="python3 benchmarks/trace_vllm_decode_steps.py --context 65536 --requests 5 --out $OUT/trace"
date
TRITON_CACHE_DIR=/tmp/tc_head timeout 220 $T --label head 2>&1 | grep -v -E "$F" | tail -6
date
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .baseline_kernels/e2e_old 2>&1 | grep -v WARN | tail -1
TRITON_CACHE_DIR=/tmp/tc_old timeout 220 $T --label old 2>&1 | grep -v -E "$F" | tail -6
date
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
timeout 100 python3 benchmarks/bench_vllm_conditions.py --out $OUT/conditions.json 2>&1 | tail -25
date
