#!/usr/bin/env bash
# Device run for the long-split attention plan: GPU tests, A/B against the session's starting kernels
# (.baseline_kernels/asynctls_base_kernels = 7a6c9e0) in one process, then the operator tables.
set -o pipefail
mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
export PYTHONUNBUFFERED=1
timeout 240 bash benchmarks/results/pipelined_schedule_h100_2026-11-26/studies/ab.sh tests
export PYTHONPATH=/tmp/s
BASES=base timeout 150 python3 benchmarks/results/scorer_iq_topk_h100_2026-11-26/studies/ab_study.py 2>&1 | grep "^{" > $OUT/ab_study.log; tail -16 $OUT/ab_study.log
B="python3 benchmarks/bench_sparse_decode.py --no-recall --no-mla --layers 4 --contexts 65536 131072"
timeout 200 $B --batches 8 --budgets 2048 1024 512 --lagged --defer-block-join --out $OUT/deferred_b8.json 2>&1 | grep -E "layers in one graph|gqa" | tail -12
timeout 150 $B --batches 8 --budgets 2048 1024 512 --out $OUT/standard_b8.json 2>&1 | grep -E "layers in one graph|gqa" | tail -12
