#!/usr/bin/env bash
# block_bound_weight on the H100: GPU kernel tests, then B=8 timing w=1 / 0.5 / 1 (noise), then GPU recall at w=0.5.
bash benchmarks/results/pipelined_schedule_h100_2026-11-26/studies/ab.sh tests  # carry .whl
export PYTHONPATH=/tmp/s PYTHONUNBUFFERED=1
B="python3 benchmarks/bench_sparse_decode.py --batches 8 --contexts 65536 131072 --budgets 2048 --no-mla --no-recall --layers 4"
for w in 1.0 0.5 1.0; do
  echo "== w=$w"; $B --block-bound-weight $w --out $OUT/speed_w${w}_$RANDOM.json 2>&1 | grep -E 'gqa|layers in one graph' | tail -4
done
echo "== lagged w=0.5 / 1.0"
for w in 0.5 1.0; do $B --lagged --block-bound-weight $w --out $OUT/speed_lagged_w${w}.json 2>&1 | grep -E 'gqa|layers in one graph' | tail -4; done
python3 benchmarks/bench_sparse_decode.py --recall-only --block-bound-weight 0.5 --out $OUT/recall_w05.json 2>&1 | tail -3
