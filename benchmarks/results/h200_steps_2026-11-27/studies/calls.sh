#!/usr/bin/env bash
# The twenty-seventh session's device calls, back to back on one warm H200 (needs_h200; each carries the kit's
# part it names): the twenty-sixth session's calls (`../../max_seqs_2026-11-27/studies/calls.sh`, whose worker
# now also times every timed run's steps: `t_runs_steps_ms`), with DeepSeek-V2-Lite at up to 136 requests.
#   kit1 (carry .vllm-gpu/p1), kit2 (carry .vllm-gpu/p2): stage the kit's first two parts
#   q_dense (carry .vllm-gpu/p3): stage its last part; Qwen3-8B-shaped decode throughput in real vLLM at 32K,
#          vLLM's default backend, random weights, up to 24 requests (--max-seqs 24: what fits dense on an H200)
#   q_sparse: the same for asynctls at budget 2048 in the dense run's KV bytes, then the report
#   glm_dense / glm_sparse: GLM-4.7-Flash's MLA shapes on an fp8 KV cache at 32K, up to 64 requests, random weights
#   mla_dense / mla_sparse: DeepSeek-V2-Lite's MLA shapes on an fp8 KV cache at 32K, up to 136 requests (135 fit
#          dense on an H100), random weights
# Writes $OUT. Each jit_lines_<stage>.log greps every tput_*.log of its folder, so from the second stage on it lists
# both engines' lines (the report counts each engine's compiles from its own log).
MLA="deepseek-v2-lite 32768 --kv-cache-dtype fp8 --weights random --max-seqs 136" \
  exec bash "$(dirname "$0")/../../max_seqs_2026-11-27/studies/calls.sh" "$@"
