#!/usr/bin/env bash
# GPU machine, after the kit's first two calls (bash .vllm-gpu/pN/install.sh .vllm-gpu/pN, N = 1, 2; carry
# .vllm-gpu/p3): MLA decode throughput on an fp8 KV cache after the wide-row attention plan and the block
# scorer's wide-key plan, one backend per call (engines of one warm machine share /tmp/tput_SHAPES), timed decode runs
# of 8, 40, 72 and 136 tokens, REPEATS repeats; then the report. Copies results to $OUT/t.
# usage: [MODEL_SHAPES=glm-4.7-flash] bash benchmarks/results/mla_stages_2026-11-27/studies/tput.sh {dense|asynctls} CONTEXTS [REPEATS]
# (MODEL_SHAPES: deepseek-v2-lite by default; glm-4.7-flash prepared 2026-11-27 and not yet run)
STAGE=$1; CONTEXTS=$2; REPEATS=${3:-3}
if [ ! -f /tmp/site/vllm/__init__.py ]; then bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1; fi
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
mkdir -p $OUT/t /tmp/tput_${MODEL_SHAPES:-deepseek-v2-lite}
python3 benchmarks/bench_vllm_e2e.py --stage $STAGE --model-shapes ${MODEL_SHAPES:-deepseek-v2-lite} --kv-cache-dtype fp8 \
  --contexts "$CONTEXTS" --budgets 2048 --repeats $REPEATS --decode-lengths 8,40,72,136 --out /tmp/tput_${MODEL_SHAPES:-deepseek-v2-lite} 2>&1 | tail -6
cp /tmp/tput_${MODEL_SHAPES:-deepseek-v2-lite}/tput_*.json $OUT/t/ 2>/dev/null
for f in /tmp/tput_${MODEL_SHAPES:-deepseek-v2-lite}/tput_*.log; do tail -c 3000 "$f" >> "$OUT/t/logs.tail"; done
python3 benchmarks/bench_vllm_e2e.py --stage report --out /tmp/tput_${MODEL_SHAPES:-deepseek-v2-lite} | tee $OUT/t/report.md
