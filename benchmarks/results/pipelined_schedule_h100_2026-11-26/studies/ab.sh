#!/usr/bin/env bash
# usage: bash .study/ab.sh WHICH(tests|new|base) extra bench args...
set -o pipefail
WHICH=$1; shift
mkdir -p /tmp/s /tmp/base
ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
# The base kernels live in .baseline_kernels/asynctls_base_kernels; never name a folder or link asynctls_tip_kernels
# inside .baseline_kernels: the A/B scripts put .baseline_kernels first on sys.path, and it would shadow the tree's
# kernels (2026-11-26: an A/B that compared the base with itself).
ln -sfn $PWD/.baseline_kernels/asynctls_base_kernels /tmp/base/asynctls_tip_kernels
export PYTHONUNBUFFERED=1
if [ "$WHICH" = tests ]; then
  pip install -q --target /tmp/pyt .whl/pytest-8.3.4-py3-none-any.whl .whl/iniconfig-2.0.0-py3-none-any.whl .whl/pluggy-1.5.0-py3-none-any.whl 2>&1 | tail -1
  PYTHONPATH=/tmp/pyt:/tmp/s PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider 2>&1 | tail -5 | tee $OUT/gpu_tests.log
  exit
fi
P=/tmp/s; [ "$WHICH" = base ] && P=/tmp/base
PYTHONPATH=$P python3 benchmarks/bench_sparse_decode.py --out $OUT/$WHICH-$RANDOM.json "$@" 2>&1 | grep -v "^$" | tee -a $OUT/$WHICH.log
