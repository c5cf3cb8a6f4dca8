#!/usr/bin/env bash
# This session's device calls (carry .whl):
#   study: the head-dim-64 sweep and A/B (hd64_split_study.py), then the compiled tests of plans, splits,
#          warm-up, workspaces and launches (in the recorded run these ran past their 150 s while compiling; the
#          two halves below covered them)
#   suite1 / suite2: the two halves of the compiled kernel tests (../../warm_gqa_2026-11-27/studies/gpu_suite.sh)
# The wide-group sweeps and A/B ran as single calls (asynctls_tip_kernels linked as in `study`):
#   PYTHONPATH=/tmp/s python3 $S/wide_group_sweep.py; SHAPES=64 PYTHONPATH=/tmp/s python3 $S/wide_group_sweep.py;
#   PYTHONPATH=/tmp/s python3 $S/wide_group_ab.py; SHAPES=128 PYTHONPATH=/tmp/s python3 $S/wide_group_sweep.py;
#   SHAPES=128 PYTHONPATH=/tmp/s python3 $S/wide_group_ab.py; then suite1 and suite2 again at the final table
# and the operator tables as tables/'s logs say (the standard and lagged B=8 tables of
# ../../attn_stages_h100_2026-11-26/studies/tables.sh a, without its test run).
# Writes $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
S=benchmarks/results/hd64_split_2026-11-27/studies
case $1 in
  study)
    mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
    PYTHONPATH=/tmp/s timeout 420 python3 $S/hd64_split_study.py > $OUT/hd64_split_study.log 2>&1; echo "study rc=$?"
    python3 - <<'PY'
import json, os
rows = json.load(open(os.path.join(os.environ["OUT"], "hd64_split_study.json")))
best = {}
for r in rows:
    if r["part"] == "sweep":
        best.setdefault((r["kv"], r["B"]), []).append((r["per_layer_us"], r["plan"], r["splits"]))
for k, v in best.items():
    t = {p: (us, s) for us, p, s in v}
    fastest = min(v)
    print(k, "fastest", fastest[2], fastest[0], "new %d %.3f" % (t["new"][1], t["new"][0] / fastest[0]),
          "old %d %.3f" % (t["old"][1], t["old"][0] / fastest[0]))
for r in rows:
    if r["part"] != "sweep":
        print(r)
PY
    export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
    python3 -c "import pytest" 2>/dev/null || { pip install -q --target /tmp/pyt .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/pyt; }
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
    timeout 150 python3 -m pytest -q --noconftest -p no:cacheprovider -m gpu tests/test_triton_kernels.py \
      -k "plan or split or warm or workspace or launch or fp8" 2>&1 | tail -5 | tee $OUT/gpu_tests_subset.log
    ;;
  suite1|suite2)
    bash benchmarks/results/warm_gqa_2026-11-27/studies/gpu_suite.sh ${1#suite}
    ;;
esac
