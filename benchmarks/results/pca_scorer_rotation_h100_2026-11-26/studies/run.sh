#!/usr/bin/env bash
# usage: bash benchmarks/results/pca_scorer_rotation_h100_2026-11-26/studies/run.sh (tests|ab)
# tests: the GPU kernel tests on the working tree's kernels; ab: the query rotation inside the pipelined
# token scorer (working tree, "new") against HEAD bd6e260's kernels (".baseline_kernels/asynctls_base_kernels",
# a rotation launch on the token stream), index_basis pca, then channels for the reference point.
set -o pipefail
S=benchmarks/results/pca_scorer_rotation_h100_2026-11-26/studies
mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/s
if [ "$1" = tests ]; then
  bash benchmarks/results/pipelined_schedule_h100_2026-11-26/studies/ab.sh tests
  exit
fi
BASIS=pca MODES=lagged,deferred BASES=base OUT=$OUT python3 $S/ab_rotate.py 2>&1 | tee $OUT/ab_pca.log
BASIS=channels MODES=deferred BASES=base OUT=$OUT python3 $S/ab_rotate.py 2>&1 | tee $OUT/ab_channels.log
ROTATE_BLOCK_D=16 BASIS=pca MODES=deferred BASES=base CTXS=65536 OUT=$OUT python3 $S/ab_rotate.py 2>&1 | tee $OUT/ab_pca_d16.log
