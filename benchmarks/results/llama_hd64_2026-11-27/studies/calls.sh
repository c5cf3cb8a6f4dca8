#!/usr/bin/env bash
# This session's device calls, back to back on one warm machine (each carries the kit's part it names):
#   op1    (carry .vllm-gpu/p1): stage the kit's first part; the operator at Llama-3.2-1B shapes (32 q / 8 kv
#          heads of 64) against SDPA, standard step, B = 8 and 32, 32K-128K, per layer with 4 layers in one graph
#   op2    (carry .vllm-gpu/p2): stage its second part; the same, lagged selection, pipelined, deferred join
#   dense  (carry .vllm-gpu/p3): stage its last part; Llama-3.2-1B-shaped decode throughput in real vLLM,
#          vLLM's default backend (FlashAttention 3), 32K / 64K / 96K, median engine step of a 136-token decode
#   sparse: the same for asynctls at budget 2048 (equal KV bytes), then the report
#   random: the same pair with --weights random, then the report; random_lagged: asynctls with --lagged, the report
# On a fresh machine, afterwards:
#   kit1 (carry .vllm-gpu/p1), kit2 (carry .vllm-gpu/p2): stage the kit again
#   check (carry .vllm-gpu/p3): the head-dim-64 check model in real vLLM: FLASH_ATTN, asynctls covering (graphs,
#          lagged) and at 256 tokens (bench_vllm_e2e --stage check --runs hd64_*)
#   kit1, kit2, then full_dense (carry .vllm-gpu/p3) and full_sparse: the throughput pair with random weights at
#          32K / 64K and as many requests as fit (--max-seqs 64), then the report
#   check2: TRITON_ATTN on the check model (the dense spread), compared in the same OUT as `check`
#   kit1, kit2, then mla_dense (carry .vllm-gpu/p3) and mla_sparse: the same at DeepSeek-V2-Lite's MLA shapes, 32K,
#          as many requests as fit, random weights, against vLLM's default MLA backend
#   profile: where the step's time goes (profile_sparse_decode: per-kernel device time, CUPTI), B=8, 64K,
#          head dim 64 and 128, standard and lagged
# Writes $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
O=/tmp/tput_llama
op() {
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device_$1.txt
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
  timeout 420 python3 benchmarks/bench_sparse_decode.py --model-shapes llama-3.2-1b --no-recall --no-mla --layers 4 \
    --budgets 2048 --batches 8 32 --contexts 32768 65536 131072 "${@:2}" --out $OUT/$1.json > $OUT/$1.log 2>&1
  echo "rc=$?"; grep -A30 "^Per layer" $OUT/$1.log
}
# tput STAGE SHAPES CONTEXTS [FLAGS...]: one throughput stage into $O, its results and log tails into $OUT/t.
tput() {
  source /tmp/vllm-env.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
  mkdir -p $OUT/t $O
  python3 benchmarks/bench_vllm_e2e.py --stage $1 --model-shapes $2 --contexts $3 "${@:4}" \
    --budgets 2048 --repeats 2 --decode-lengths 8,136 --out $O 2>&1 | tail -6
  cp $O/tput_*.json $OUT/t/ 2>/dev/null
  for f in $O/tput_*.log; do tail -c 3000 "$f" > "$OUT/t/$(basename "$f").tail"; done
  grep -h "jit_monitor\|JIT compilation" $O/tput_*.log > $OUT/t/jit_lines.log; wc -l < $OUT/t/jit_lines.log
}
LLAMA="llama-3.2-1b 32768,65536,98304"
FULL="--weights random --max-seqs 64"
case $1 in
  op1)
    bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 | tail -1
    op standard_b8_b32
    ;;
  op2)
    bash .vllm-gpu/p2/install.sh .vllm-gpu/p2 | tail -1
    op deferred_b8_b32 --lagged --defer-block-join
    ;;
  dense)
    bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
    tput dense $LLAMA
    ;;
  kit1|kit2)
    bash .vllm-gpu/p${1#kit}/install.sh .vllm-gpu/p${1#kit} | tail -1
    ;;
  check)
    bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
    source /tmp/vllm-env.sh
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
    timeout 540 python3 benchmarks/bench_vllm_e2e.py --stage check --time-budget 500 --out /tmp/chk64 \
      --runs hd64_flash_attn,hd64_asynctls_cover,hd64_asynctls_cover_lagged,hd64_asynctls_256 2>&1 | tail -40
    mkdir -p $OUT/check; cp /tmp/chk64/check_summary*.json $OUT/check/ 2>/dev/null
    for f in /tmp/chk64/check_*.log; do tail -c 3000 "$f" > "$OUT/check/$(basename "$f").tail"; done
    ;;
  random)
    O=/tmp/tput_llama_rw; tput dense $LLAMA --weights random; tput asynctls $LLAMA --weights random
    python3 benchmarks/bench_vllm_e2e.py --stage report --out $O | tee $OUT/t/report.md
    ;;
  random_lagged)
    O=/tmp/tput_llama_rw; tput asynctls $LLAMA --weights random --lagged
    python3 benchmarks/bench_vllm_e2e.py --stage report --out $O | tee $OUT/t/report.md
    ;;
  check2)
    source /tmp/vllm-env.sh
    timeout 240 python3 benchmarks/bench_vllm_e2e.py --stage check --time-budget 200 --out /tmp/chk64 \
      --runs hd64_triton_attn 2>&1 | tail -30
    mkdir -p $OUT/check; cp /tmp/chk64/check_summary*.json $OUT/check/
    tail -c 3000 /tmp/chk64/check_hd64_triton_attn.log > $OUT/check/check_hd64_triton_attn.log.tail
    ;;
  full_dense)
    bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
    O=/tmp/tput_llama_full; tput dense llama-3.2-1b 32768,65536 $FULL
    ;;
  full_sparse)
    O=/tmp/tput_llama_full; tput asynctls llama-3.2-1b 32768,65536 $FULL
    python3 benchmarks/bench_vllm_e2e.py --stage report --out $O | tee $OUT/t/report.md
    ;;
  mla_dense)
    bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
    O=/tmp/tput_mla_full; tput dense deepseek-v2-lite 32768 $FULL
    ;;
  mla_sparse)
    O=/tmp/tput_mla_full; tput asynctls deepseek-v2-lite 32768 $FULL
    python3 benchmarks/bench_vllm_e2e.py --stage report --out $O | tee $OUT/t/report.md
    ;;
  profile)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device_profile.txt
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
    mkdir -p $OUT/profile
    for shapes in llama-3.2-1b qwen3-8b; do for lag in "" --lagged; do
      cd benchmarks && timeout 120 python3 profile_sparse_decode.py --model-shapes $shapes $lag \
        --out $OUT/profile/${shapes}${lag:+_lagged}.json 2>&1 | tail -12; cd ..
    done; done
    ;;
  sparse)
    tput asynctls $LLAMA
    python3 benchmarks/bench_vllm_e2e.py --stage report --out $O | tee $OUT/t/report.md
    ;;
esac
