mkdir -p /tmp/new /tmp/base
ln -sfn $PWD/kernels /tmp/new/asynctls_tip_kernels
ln -sfn $PWD/.study/base/kernels /tmp/base/asynctls_tip_kernels
for i in 1 2; do
for v in base new; do
  echo "== $v $i"
  PYTHONPATH=/tmp/$v timeout 60 python3 benchmarks/profile_sparse_decode.py --out $OUT/profile_${v}_$i.json 2>&1 | grep -E "whole|topk|token_score"
done
done
for v in base new; do
  echo "== $v lagged"
  PYTHONPATH=/tmp/$v timeout 60 python3 benchmarks/profile_sparse_decode.py --lagged --out $OUT/profile_${v}_lagged.json 2>&1 | grep -E "whole"
done
