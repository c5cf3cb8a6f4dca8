#!/usr/bin/env bash
# GPU machine, after gpu.sh installed the kit: MLA decode throughput on an fp8 KV cache, vLLM's default MLA
# backend (FLASHMLA on SM90 for fp8) then asynctls at the paper's settings with the dense run's KV bytes,
# DeepSeek-V2-Lite shapes, dummy weights, 2 repeats; then the report. Writes to $OUT/t.
# usage: bash benchmarks/results/mla_fp8_2026-11-27/studies/tput.sh [CONTEXTS]
source /tmp/vllm-env.sh; mkdir -p $OUT/t
for stage in dense asynctls; do
  python3 benchmarks/bench_vllm_e2e.py --stage $stage --model-shapes deepseek-v2-lite --kv-cache-dtype fp8 \
    --contexts "${1:-65536}" --budgets 2048 --repeats 2 --out /tmp/tput_mla_fp8 2>&1 | tail -6
done
cp /tmp/tput_mla_fp8/tput_*.json $OUT/t/
for f in /tmp/tput_mla_fp8/tput_*.log; do tail -c 5000 "$f" > "$OUT/t/$(basename "$f").tail"; done
python3 benchmarks/bench_vllm_e2e.py --stage report --out /tmp/tput_mla_fp8 | tee $OUT/t/report.md
