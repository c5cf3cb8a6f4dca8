#!/usr/bin/env bash
# After the many-groups rule (ATTN_WIDE_MANY_GROUPS_SPLIT_TILES = 4), three calls on one warm H200:
#   a (carry .vllm-gpu/p1): stage the kit's first part; the rule against the long splits it replaced, new shapes
#   b (carry .vllm-gpu/p2): stage its second part
#   c (carry .vllm-gpu/p3): stage its last part; the asynctls throughput stage of DeepSeek-V2-Lite at 32K, fp8,
#     136 requests, against this session's dense run (its JSON from the repository: same kind of card, another
#     machine), then the report. Writes $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
S=benchmarks/results/h200_steps_2026-11-27
case $1 in
  a) bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 | tail -1
     python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
     cd benchmarks
     CASES="16:136 20:136 20:200 128:48 128:64 16:160" BEFORE=1 TILES="1 2" NAME=many_groups_ab \
       python3 results/h200_steps_2026-11-27/studies/wide_split_sweep.py 2>&1 | grep -v "Warning\|warn_once"
     CASES="16:136" BEFORE=1 TILES="" FP8=0 NAME=many_groups_ab_bf16 \
       python3 results/h200_steps_2026-11-27/studies/wide_split_sweep.py 2>&1 | grep -v "Warning\|warn_once" ;;
  b) bash .vllm-gpu/p2/install.sh .vllm-gpu/p2 | tail -1 ;;
  c) bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
     mkdir -p /tmp/tput_mla && cp $S/tput_mla/tput_dense.json /tmp/tput_mla/
     cp $S/tput_mla/tput_dense.log.tail /tmp/tput_mla/tput_dense.log
     source /tmp/vllm-env.sh
     python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
     D=$OUT/tput_mla_many_groups; mkdir -p $D
     nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $D/device_asynctls.txt
     python3 benchmarks/bench_vllm_e2e.py --stage asynctls --model-shapes deepseek-v2-lite --contexts 32768 \
       --kv-cache-dtype fp8 --weights random --max-seqs 136 --budgets 2048 --repeats 2 --decode-lengths 8,136 \
       --out /tmp/tput_mla 2>&1 | tail -4
     cp /tmp/tput_mla/tput_asynctls_*.json $D/
     for f in /tmp/tput_mla/tput_asynctls_*.log; do tail -c 3000 "$f" > "$D/$(basename "$f").tail"; done
     grep -h "jit_monitor\|JIT compilation" /tmp/tput_mla/tput_asynctls_*.log > $D/jit_lines_asynctls.log
     python3 benchmarks/bench_vllm_e2e.py --stage report --out /tmp/tput_mla | tee $D/report.md ;;
  *) echo "unknown call $1"; exit 2 ;;
esac
