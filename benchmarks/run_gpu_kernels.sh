#!/usr/bin/env bash
# One command on the GPU machine: make the package importable, run the Triton kernel tests, then the
# sparse decode benchmark; logs and JSON under $OUT (default benchmarks/out).
# Usage: bash benchmarks/run_gpu_kernels.sh [--quick] [extra benchmark args]
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The folder kernels/ is imported as asynctls_tip_kernels (see pyproject.toml): a link does it
# without installing anything.
SITE=/tmp/asynctls_site
mkdir -p "$SITE"
ln -sfn "$PWD/kernels" "$SITE/asynctls_tip_kernels"
if ! python3 -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/bench_sparse_decode.py --out "$OUT/sparse_decode.json" "$@" 2>&1 | tee "$OUT/bench.log"
