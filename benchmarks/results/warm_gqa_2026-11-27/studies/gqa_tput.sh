#!/usr/bin/env bash
# GPU machine, after the kit's first two calls (carry .vllm-gpu/p3): Qwen3-8B-shaped GQA decode throughput in real
# vLLM, bf16 KV cache, asynctls (budget 2048) vs vLLM's default (FlashAttention 3) in the same KV bytes, by the
# median engine step of a 136-token decode stepped one `LLMEngine.step()` at a time (and the older rate from timed
# runs of 8 and 136 tokens). One backend per call, dense first (asynctls takes its KV bytes); LAGGED=1 adds
# --lagged; TPUT_DIR picks the engines' folder (default /tmp/tput_qwen3-8b). Writes $OUT/t.
# usage: bash benchmarks/results/warm_gqa_2026-11-27/studies/gqa_tput.sh {dense|asynctls} CONTEXTS [REPEATS]
STAGE=$1; CONTEXTS=$2; REPEATS=${3:-2}
if [ ! -f /tmp/site/vllm/__init__.py ]; then bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 || exit 1; fi
source /tmp/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
O=${TPUT_DIR:-/tmp/tput_qwen3-8b}; mkdir -p $OUT/t $O
python3 benchmarks/bench_vllm_e2e.py --stage $STAGE --model-shapes qwen3-8b --contexts "$CONTEXTS" --budgets 2048 \
  --repeats $REPEATS --decode-lengths 8,136 ${LAGGED:+--lagged} --out $O 2>&1 | tail -6
cp $O/tput_*.json $OUT/t/ 2>/dev/null
for f in $O/tput_*.log; do tail -c 3000 "$f" >> "$OUT/t/logs.tail"; done
grep -h "jit_monitor\|JIT compilation" $O/tput_*.log > $OUT/t/jit_lines.log; wc -l < $OUT/t/jit_lines.log
python3 benchmarks/bench_vllm_e2e.py --stage report --out $O | tee $OUT/t/report.md
