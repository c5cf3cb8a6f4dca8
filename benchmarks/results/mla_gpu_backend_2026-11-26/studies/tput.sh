#!/usr/bin/env bash
# GPU machine: decode throughput of DeepSeek-V2-Lite shapes (MLA, dummy weights) in vLLM 0.26, the default
# MLA backend (stage dense) or asynctls at the paper's settings (stage asynctls; same KV bytes as dense).
# usage: bash .../tput.sh {dense|asynctls} [CONTEXTS] [BUDGETS]   (after the kit's three calls for dense)
STAGE=$1
[ -f /tmp/vllm-env.sh ] || bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
python3 benchmarks/bench_vllm_e2e.py --stage "$STAGE" --model-shapes deepseek-v2-lite --contexts "${2:-65536}" \
  --budgets "${3:-2048}" --repeats 2 --out /tmp/tput_dsv2 2>&1 | tail -30
cp /tmp/tput_dsv2/tput_*.json $OUT/ 2>/dev/null
for f in /tmp/tput_dsv2/tput_*.log; do tail -c 5000 "$f" > "$OUT/$(basename "$f").tail"; done
[ "$STAGE" = asynctls ] && python3 benchmarks/bench_vllm_e2e.py --stage report --out /tmp/tput_dsv2 | tee $OUT/report.md
exit 0
