#!/usr/bin/env bash
# This session's device calls, back to back on one warm machine (each carries the kit's part it names):
#   kit1 (carry .vllm-gpu/p1), kit2 (carry .vllm-gpu/p2): stage the kit's first two parts
#   q_dense (carry .vllm-gpu/p3): stage its last part; Qwen3-8B-shaped decode throughput in real vLLM at 32K,
#          vLLM's default backend, random weights, up to 24 requests (--max-seqs 24: what fits dense on an H200;
#          11 fit on an H100)
#   q_sparse: the same for asynctls at budget 2048 in the dense run's KV bytes, then the report
#   glm_dense / glm_sparse: GLM-4.7-Flash's MLA shapes on an fp8 KV cache at 32K, up to 64 requests, random weights
#   mla_dense / mla_sparse: DeepSeek-V2-Lite's MLA shapes on an fp8 KV cache at 32K, likewise
# Writes $OUT. (The files of this session's runs were written as jit_lines.log, each call's overwriting the last
# one's in its folder; they are kept as jit_lines_dense.log / jit_lines_asynctls.log, tput_mla holding only the
# second, which lists both engines' lines as each of these files does from the second stage on.)
set -o pipefail
export PYTHONUNBUFFERED=1
# tput OUTDIR STAGE SHAPES CONTEXTS [FLAGS...]: one throughput stage into OUTDIR, its results and log tails
# into $OUT/<name of OUTDIR>.
tput() {
  local O=$1; shift
  source /tmp/vllm-env.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
  local D=$OUT/$(basename $O); mkdir -p $D $O
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $D/device_$1.txt
  python3 benchmarks/bench_vllm_e2e.py --stage $1 --model-shapes $2 --contexts $3 "${@:4}" \
    --budgets 2048 --repeats 2 --decode-lengths 8,136 --out $O 2>&1 | tail -6
  cp $O/tput_*.json $D/ 2>/dev/null
  for f in $O/tput_*.log; do tail -c 3000 "$f" > "$D/$(basename "$f").tail"; done
  grep -h "jit_monitor\|JIT compilation" $O/tput_*.log > $D/jit_lines_$1.log; wc -l < $D/jit_lines_$1.log
}
report() { python3 benchmarks/bench_vllm_e2e.py --stage report --out $1 | tee $OUT/$(basename $1)/report.md; }
QWEN="qwen3-8b 32768 --weights random --max-seqs 24"
GLM="glm-4.7-flash 32768 --kv-cache-dtype fp8 --weights random --max-seqs 64"
MLA=${MLA:-"deepseek-v2-lite 32768 --kv-cache-dtype fp8 --weights random --max-seqs 64"}  # MLA=...: another cap
case $1 in
  kit1|kit2) bash .vllm-gpu/p${1#kit}/install.sh .vllm-gpu/p${1#kit} | tail -1 ;;
  q_dense) bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1; tput /tmp/tput_qwen dense $QWEN ;;
  q_sparse) tput /tmp/tput_qwen asynctls $QWEN; report /tmp/tput_qwen ;;
  glm_dense) tput /tmp/tput_glm dense $GLM ;;
  glm_sparse) tput /tmp/tput_glm asynctls $GLM; report /tmp/tput_glm ;;
  mla_dense) tput /tmp/tput_mla dense $MLA ;;
  mla_sparse) tput /tmp/tput_mla asynctls $MLA; report /tmp/tput_mla ;;
  *) echo "unknown call $1"; exit 2 ;;
esac
