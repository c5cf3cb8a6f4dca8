#!/usr/bin/env bash
# This session's device calls after gpu1.sh, back to back on one warm machine (carry .whl and the kit's part
# of the call):
#   ab     (carry .vllm-gpu/p1): stage the kit's first part; the fp8 slot A/B (fp8_slots_ab.py)
#   suite1 (carry .vllm-gpu/p2): stage its second part; the first half of the compiled kernel tests
#   dense  (carry .vllm-gpu/p3): stage its last part; Qwen3-8B-shaped decode throughput on an fp8 KV cache,
#          vLLM's default (FlashAttention 3), 64K, median engine step of a 136-token decode
#   sparse: the same for asynctls, the report; then the real-vLLM MLA fp8 check runs
#   suite2: the second half of the compiled kernel tests
# Writes $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
S=benchmarks/results/fp8_split_h100_2026-11-27/studies
O=/tmp/tput_fp8
tput() {
  source /tmp/vllm-env.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
  mkdir -p $OUT/t $O
  python3 benchmarks/bench_vllm_e2e.py --stage $1 --kv-cache-dtype fp8 --model-shapes qwen3-8b --contexts 65536 \
    --budgets 2048 --repeats 2 --decode-lengths 8,136 --out $O 2>&1 | tail -6
  cp $O/tput_*.json $OUT/t/ 2>/dev/null
  for f in $O/tput_*.log; do tail -c 3000 "$f" > "$OUT/t/$(basename "$f").tail"; done
  grep -h "jit_monitor\|JIT compilation" $O/tput_*.log > $OUT/t/jit_lines.log; wc -l < $OUT/t/jit_lines.log
}
case $1 in
  ab)
    bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 | tail -1
    mkdir -p /tmp/s; ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
    PYTHONPATH=/tmp/s timeout 400 python3 $S/fp8_slots_ab.py > $OUT/fp8_slots_ab.log 2>&1
    python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "fp8_slots_ab.json")))
t = {}
for r in d["rows"]:
    if "slots" in r:
        t.setdefault((r["L"], r["B"], r["sample"]), {}).setdefault(r["slots"], []).append(r["per_layer_us"])
    else:
        print(r)
for k, v in t.items():
    print(k, "new/old %.3f" % (min(v["new"]) / min(v["old"])), v)
for r in d["split_kernel"]:
    print({k: v for k, v in r.items() if k != "key"})
PY
    ;;
  suite1|suite2)
    bash .vllm-gpu/p2/install.sh .vllm-gpu/p2 2>/dev/null | tail -1
    bash benchmarks/results/warm_gqa_2026-11-27/studies/gpu_suite.sh ${1#suite}
    ;;
  dense)
    bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
    tput dense
    ;;
  sparse)
    tput asynctls
    python3 benchmarks/bench_vllm_e2e.py --stage report --out $O | tee $OUT/t/report.md
    timeout 250 python3 benchmarks/bench_vllm_e2e.py --stage check --runs mla_triton_fp8,mla_asynctls_cover_fp8,mla_asynctls_256_fp8 \
      --time-budget 240 --out /tmp/chk_fp8 2>&1 | tail -30
    cp /tmp/chk_fp8/check_summary*.json $OUT/ 2>/dev/null
    for f in /tmp/chk_fp8/check_*.log; do tail -c 3000 "$f" > "$OUT/$(basename "$f").tail"; done
    ;;
esac
