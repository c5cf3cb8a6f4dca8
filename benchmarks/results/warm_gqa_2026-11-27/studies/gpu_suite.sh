#!/usr/bin/env bash
# GPU machine (carry .whl): the compiled kernel tests in two halves, one per call (the whole suite runs past one
# call's limit). usage: bash gpu_suite.sh {1|2}. Writes $OUT/gpu_tests_half<N>.log.
export PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
python3 -c "import pytest" 2>/dev/null || { pip install -q --target /tmp/pyt .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/pyt; }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider --co 2>/dev/null \
  | grep "::" > /tmp/ids.txt
n=$(wc -l < /tmp/ids.txt); h=$(( (n + 1) / 2 ))
if [ "$1" = 1 ]; then head -n $h /tmp/ids.txt > /tmp/half.txt; else tail -n +$((h + 1)) /tmp/ids.txt > /tmp/half.txt; fi
echo "half $1: $(wc -l < /tmp/half.txt) of $n tests" | tee $OUT/gpu_tests_half$1.log
timeout 540 python3 -m pytest -q --noconftest -p no:cacheprovider -m gpu $(cat /tmp/half.txt) 2>&1 | tail -8 \
  | tee -a $OUT/gpu_tests_half$1.log
