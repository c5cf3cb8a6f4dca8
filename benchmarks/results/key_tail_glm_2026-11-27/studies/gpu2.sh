#!/usr/bin/env bash
# GPU machine, call 2 (carry .vllm-gpu/p2): stage the kit's second part, then the operator profiles at this
# code: MLA at 16 and 20 heads (GLM-4.7-Flash), B=16, 32K, and Qwen3-8B GQA at B=8, 64K. Writes $OUT.
export PYTHONUNBUFFERED=1
bash .vllm-gpu/p2/install.sh .vllm-gpu/p2 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
mkdir -p $OUT/profiles
for h in 16 20; do
  timeout 100 python3 benchmarks/profile_sparse_decode.py --mla --heads $h --batch 16 --context 32768 \
    --out $OUT/profiles/mla_h${h}_b16_32k.json 2>&1 | grep -v "Warning\|warn_once" | tee -a $OUT/profiles.log
done
timeout 100 python3 benchmarks/profile_sparse_decode.py --batch 8 --context 65536 --out $OUT/profiles/gqa_b8_64k.json \
  2>&1 | grep -v "Warning\|warn_once" | tee -a $OUT/profiles.log
