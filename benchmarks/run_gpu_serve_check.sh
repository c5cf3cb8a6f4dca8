#!/usr/bin/env bash
# `vllm serve MODEL --attention-backend asynctls` on the GPU machine: the console command users run,
# with the CUDA build of vLLM (the kit from ../shared/tools/vllm-gpu, installed and sourced first).
# Builds the tiny Qwen3 of tests/tiny_models.py in bf16 (random weights), serves it with vLLM's defaults
# (torch.compile, CUDA graphs), sends one completion over a prompt past dense_threshold and checks
# that the plugin's backend served it. Logs under $OUT (default benchmarks/out).
# SERVE_SPEC=MLA serves a 4-layer DeepSeek-V3-shaped MLA model instead (bench_vllm_e2e.py's check model:
# the tiny CPU test model's head dims have no vLLM GPU MLA prefill backend); arguments are passed on to
# `vllm serve` (e.g. --kv-cache-dtype fp8).
# Usage: source /tmp/vllm-env.sh && [SERVE_SPEC=MLA] bash benchmarks/run_gpu_serve_check.sh [VLLM_SERVE_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
if [ "${SERVE_SPEC:-}" = MLA ]; then  # the MLA check model of bench_vllm_e2e.py (dims vLLM's GPU MLA prefill takes)
  MODEL=$(python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import bench_vllm_e2e as b; print(b.small_mla_model_dir(Path('/tmp/serve_models')))")
else
  MODEL=$(python3 -c "import sys; sys.path.insert(0, 'tests'); import tiny_models as t; print(t.cached_model(t.QWEN3_GQA, '/tmp/tiny_models'))")
fi
KNOBS='{"asynctls": {"token_budget": 128, "num_blocks": 16, "selection_block_size": 16, "sink_tokens": 16, "local_tokens": 16, "dense_threshold": 256}}'
# The `vllm` console script, or its module (the kit puts vLLM on PYTHONPATH, not on PATH).
if command -v vllm > /dev/null; then VLLM=(vllm); else VLLM=(python3 -m vllm.entrypoints.cli.main); fi
"${VLLM[@]}" serve "$MODEL" --attention-backend asynctls --dtype bfloat16 --max-model-len 2048 --port 8765 \
  --gpu-memory-utilization 0.3 --additional-config "$KNOBS" "$@" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do
  curl -sf localhost:8765/v1/models > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -40 "$OUT/serve.log"; exit 1; }
  sleep 2
done
python3 - "$MODEL" "$OUT" <<'PY'
import json, re, sys, urllib.request
model, out = sys.argv[1], sys.argv[2]
prompt = " ".join(f"w{i % 50}" for i in range(400))
body = json.dumps(dict(model=model, prompt=prompt, max_tokens=16, temperature=0.0, ignore_eos=True)).encode()
req = urllib.request.Request("http://localhost:8765/v1/completions", data=body, headers={"Content-Type": "application/json"})
completion = json.load(urllib.request.urlopen(req, timeout=300))
log = open(f"{out}/serve.log").read()
result = dict(usage=completion["usage"], finish_reason=completion["choices"][0]["finish_reason"],
              # built by the GPU decode paths (GQA, MLA)
              sparse_decode_path=re.search(r"asynctls( \(MLA\))?: decode workspace arena", log) is not None,
              log_lines=[l for l in log.splitlines() if "asynctls" in l and "non-default" not in l][:8])
json.dump(result, open(f"{out}/serve_check.json", "w"), indent=1)
print(json.dumps(result, indent=1))
assert completion["usage"]["completion_tokens"] == 16 and result["sparse_decode_path"]
PY
