#!/usr/bin/env bash
# The plugin's default granularity (blocks of 16, 512 kept: the same 8,192 candidates) against the paper's (64 x 128)
# on the H100: B=8 operator per layer (4 layers in one graph), standard and lagged, and w = 0.5; GPU recall at 16K.
mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
export PYTHONPATH=/tmp/s PYTHONUNBUFFERED=1
B="python3 benchmarks/bench_sparse_decode.py --batches 8 --contexts 65536 131072 --budgets 2048 --no-mla --no-recall --layers 4"
F="gqa|layers in one graph"
echo "== S64 x 128"; $B --out $OUT/s64.json 2>&1 | grep -E "$F" | tail -4
echo "== S16 x 512"; $B --selection-block-size 16 --num-blocks 512 --out $OUT/s16.json 2>&1 | grep -E "$F" | tail -4
echo "== S16 x 512, w 0.5"; $B --selection-block-size 16 --num-blocks 512 --block-bound-weight 0.5 --out $OUT/s16_w05.json 2>&1 | grep -E "$F" | tail -4
echo "== lagged S64 x 128"; $B --lagged --out $OUT/s64_lagged.json 2>&1 | grep -E "$F" | tail -4
echo "== lagged S16 x 512"; $B --lagged --selection-block-size 16 --num-blocks 512 --out $OUT/s16_lagged.json 2>&1 | grep -E "$F" | tail -4
python3 benchmarks/bench_sparse_decode.py --recall-only --selection-block-size 16 --num-blocks 512 --out $OUT/recall_s16.json 2>&1 | tail -3
