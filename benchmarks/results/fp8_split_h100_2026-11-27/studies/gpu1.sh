#!/usr/bin/env bash
# First device call of 2026-11-27's second session (H100): the fp8 split sweep and a bf16 control on the same
# machine, then the deferred-join operator tables (B=8, B=32) at the current code.
set -o pipefail
mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/s
S=benchmarks/results/fp8_split_h100_2026-11-27/studies
timeout 120 python3 $S/fp8_split_sweep.py > $OUT/fp8_split_sweep.log 2>&1; tail -2 $OUT/fp8_split_sweep.log
KV=bf16 timeout 120 python3 $S/fp8_split_sweep.py > $OUT/bf16_split_sweep.log 2>&1; tail -2 $OUT/bf16_split_sweep.log
bash benchmarks/results/attn_stages_h100_2026-11-26/studies/tables.sh b
