#!/usr/bin/env bash
# operator tables with the index-write column, and profiles
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SITE=/tmp/s; mkdir -p $SITE
ln -sfn $PWD/kernels $SITE/asynctls_tip_kernels
export PYTHONPATH=$SITE
for ctx in 65536 131072; do
  for lag in "" "--lagged"; do
    PYTHONPATH=$SITE:$PWD/benchmarks timeout 100 python3 benchmarks/profile_sparse_decode.py --context $ctx $lag --out $OUT/profile_${ctx}${lag:+_lagged}.json 2>&1 | grep -E "whole step|index write"
  done
done
B="python3 benchmarks/bench_sparse_decode.py"
timeout 200 $B --batches 1 8 32 --contexts 65536 131072 --budgets 2048 1024 --no-mla --no-recall --out $OUT/op_standard.json 2>&1 | grep -E "^\| gqa"
timeout 200 $B --batches 8 32 --contexts 65536 131072 --budgets 2048 1024 --no-mla --no-recall --lagged --out $OUT/op_lagged.json 2>&1 | grep -E "^\| gqa"
