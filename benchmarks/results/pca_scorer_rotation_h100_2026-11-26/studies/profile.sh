#!/usr/bin/env bash
# Where pca's remaining cost in the pipelined step goes: per-kernel device time (eager, CUPTI, PDL off) of the
# lagged step with channels and with pca, B=8, 64K and 128K, budget 2048.
set -o pipefail
mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/s:benchmarks
for ctx in 65536 131072; do
  for basis in channels pca; do
    python3 benchmarks/profile_sparse_decode.py --lagged --context $ctx --index-basis $basis --out $OUT/profile_${basis}_${ctx}.json 2>&1 | grep -v Warn
  done
done
