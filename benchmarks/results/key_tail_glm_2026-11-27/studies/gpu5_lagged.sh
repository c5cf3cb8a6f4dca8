#!/usr/bin/env bash
# GPU machine, call 5 (after tput.sh's two calls, on the same warm machine): the lagged (pipelined) asynctls
# engine on the same GLM-4.7-Flash shapes and KV bytes, then the report over all three engines. Writes $OUT/t.
source /tmp/vllm-env.sh && mkdir -p $OUT/t
python3 benchmarks/bench_vllm_e2e.py --stage asynctls --lagged --model-shapes glm-4.7-flash --kv-cache-dtype fp8 \
  --contexts 32768,65536 --budgets 2048 --repeats 3 --decode-lengths 8,40,72,136 --out /tmp/tput_glm-4.7-flash 2>&1 | tail -3
cp /tmp/tput_glm-4.7-flash/tput_*.json $OUT/t/
tail -c 3000 /tmp/tput_glm-4.7-flash/tput_asynctls_2048_lagged.log > $OUT/t/lagged.log.tail
python3 benchmarks/bench_vllm_e2e.py --stage report --out /tmp/tput_glm-4.7-flash | tee $OUT/t/report.md
