mkdir -p /tmp/s && ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
pip install -q --target /tmp/pyt .whl/pytest-8.3.4-py3-none-any.whl .whl/iniconfig-2.0.0-py3-none-any.whl .whl/pluggy-1.5.0-py3-none-any.whl 2>&1 | tail -1
PYTHONPATH=/tmp/pyt:/tmp/s PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 250 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log; grep FAILED $OUT/gpu_tests.log | head
export PYTHONPATH=/tmp/s
timeout 150 python3 benchmarks/bench_sparse_decode.py --batches 8 --contexts 65536 --budgets 2048 --no-mla --no-recall --layers 2 --out $OUT/quick_layers2.json 2>&1 | grep -E "^\||layers"
for l in "" "--lagged"; do timeout 60 python3 benchmarks/profile_sparse_decode.py $l --out $OUT/profile_65536$l.json 2>&1 | grep whole; done
