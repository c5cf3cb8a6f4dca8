#!/usr/bin/env bash
# GPU machine, after the kit's first two calls (gpu1.sh and gpu2.sh stage .vllm-gpu/p1 and p2; carry
# .vllm-gpu/p3): GLM-4.7-Flash-shaped MLA decode throughput on an fp8 KV cache with this session's code (the
# one-pass write, the 17-32-head token plan, the write reading k_pe apart), one backend per call (engines of one
# warm machine share /tmp/tput_SHAPES): timed decode runs of 8, 40, 72 and 136 tokens, REPEATS repeats, and the
# 136-token decode stepped one engine step at a time (median step); then the report. Copies results to $OUT/t.
# usage: [MODEL_SHAPES=deepseek-v2-lite] bash benchmarks/results/key_tail_glm_2026-11-27/studies/tput.sh {dense|asynctls} CONTEXTS [REPEATS]
STAGE=$1; CONTEXTS=$2; REPEATS=${3:-3}
if [ ! -f /tmp/site/vllm/__init__.py ]; then bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1; fi
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
mkdir -p $OUT/t /tmp/tput_${MODEL_SHAPES:-glm-4.7-flash}
python3 benchmarks/bench_vllm_e2e.py --stage $STAGE --model-shapes ${MODEL_SHAPES:-glm-4.7-flash} --kv-cache-dtype fp8 \
  --contexts "$CONTEXTS" --budgets 2048 --repeats $REPEATS --decode-lengths 8,40,72,136 --out /tmp/tput_${MODEL_SHAPES:-glm-4.7-flash} 2>&1 | tail -6
cp /tmp/tput_${MODEL_SHAPES:-glm-4.7-flash}/tput_*.json $OUT/t/ 2>/dev/null
for f in /tmp/tput_${MODEL_SHAPES:-glm-4.7-flash}/tput_*.log; do tail -c 3000 "$f" >> "$OUT/t/logs.tail"; done
python3 benchmarks/bench_vllm_e2e.py --stage report --out /tmp/tput_${MODEL_SHAPES:-glm-4.7-flash} | tee $OUT/t/report.md
