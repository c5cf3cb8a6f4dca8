mkdir -p /tmp/s && ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
pip install -q --target /tmp/pyt .whl/pytest-8.3.4-py3-none-any.whl .whl/iniconfig-2.0.0-py3-none-any.whl .whl/pluggy-1.5.0-py3-none-any.whl 2>&1 | tail -1
PYTHONPATH=/tmp/pyt:/tmp/s PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 200 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log
export PYTHONPATH=/tmp/s
timeout 260 python3 benchmarks/bench_sparse_decode.py --batches 8 32 --contexts 65536 131072 --budgets 2048 1024 512 --no-mla --no-recall --layers 4 --out $OUT/std.json > $OUT/std.log 2>&1; grep -E "^\|" $OUT/std.log
timeout 200 python3 benchmarks/bench_sparse_decode.py --batches 8 32 --contexts 65536 131072 --budgets 2048 1024 --no-mla --no-recall --layers 4 --lagged --out $OUT/lagged.json > $OUT/lagged.log 2>&1; grep -E "^\|" $OUT/lagged.log
for c in 65536 131072; do timeout 60 python3 benchmarks/profile_sparse_decode.py --context $c --out $OUT/profile_$c.json 2>&1 | grep -v Warn | tail -8; done
timeout 60 python3 benchmarks/profile_sparse_decode.py --lagged --out $OUT/profile_65536_lagged.json 2>&1 | grep whole
