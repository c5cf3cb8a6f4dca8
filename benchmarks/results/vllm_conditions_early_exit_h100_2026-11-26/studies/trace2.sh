#!/usr/bin/env bash
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
for L in standard lagged; do X=""; [ $L = lagged ] && X=--lagged
  timeout 200 python3 benchmarks/trace_vllm_decode_steps.py --backend asynctls --context 65536 --long 72 --profile-steps 40 --profile-len 3 $X --label $L --out $OUT/trace 2>&1 | grep -E "^(prefill|short|long|wrote)"
done
rm -rf $OUT/trace/models $OUT/trace/triton_cache
