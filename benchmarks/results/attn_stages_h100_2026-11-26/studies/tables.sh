#!/usr/bin/env bash
# The operator tables with the long-split attention plan: `bash THIS a` (GPU tests, standard and lagged
# B=8 tables) and `bash THIS b` (deferred-join B=8 table, B=32 at 64K), each one device call.
set -o pipefail
mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
export PYTHONUNBUFFERED=1
T="python3 benchmarks/bench_sparse_decode.py --no-recall --no-mla --layers 4 --budgets 2048"
C="--batches 8 --contexts 16384 32768 65536 131072"
if [ "$1" = a ]; then
  timeout 240 bash benchmarks/results/pipelined_schedule_h100_2026-11-26/studies/ab.sh tests
  export PYTHONPATH=/tmp/s
  timeout 160 $T $C --out $OUT/standard_b8.json 2>&1 | grep -v "^$" > $OUT/standard_b8.log; tail -3 $OUT/standard_b8.log
  timeout 160 $T $C --lagged --out $OUT/lagged_b8.json 2>&1 | grep -v "^$" > $OUT/lagged_b8.log; tail -3 $OUT/lagged_b8.log
else
  export PYTHONPATH=/tmp/s
  timeout 200 $T $C --lagged --defer-block-join --out $OUT/deferred_b8.json 2>&1 | grep -v "^$" > $OUT/deferred_b8.log; tail -6 $OUT/deferred_b8.log
  timeout 200 $T --batches 32 --contexts 65536 --lagged --defer-block-join --out $OUT/deferred_b32.json 2>&1 | grep -v "^$" > $OUT/deferred_b32.log; tail -4 $OUT/deferred_b32.log
fi
