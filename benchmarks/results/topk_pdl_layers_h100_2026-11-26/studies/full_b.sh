mkdir -p /tmp/s && ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
export PYTHONPATH=/tmp/s PYTHONUNBUFFERED=1
date
timeout 560 python3 benchmarks/bench_sparse_decode.py --batches 32 --layers 4 --out $OUT/full_b32_mla_recall.json > $OUT/full_b32_mla_recall.log 2>&1
date
grep -E "^\|" $OUT/full_b32_mla_recall.log
