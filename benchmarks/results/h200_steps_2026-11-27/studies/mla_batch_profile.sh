#!/usr/bin/env bash
# GPU machine (no vLLM needed): how the MLA operator's per-layer time grows with the batch, at the shapes of
# the throughput rows (DeepSeek-V2-Lite: 16 heads; GLM-4.7-Flash: 20), fp8 cache, 32K, budget 2048, blocks of
# 64 x 128. Writes $OUT/profile_mla/*.json and the printed kernel lines.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
mkdir -p $OUT/profile_mla
cd benchmarks
for hb in ${CASES:-16:16 16:64 16:136 20:64}; do
  h=${hb%:*}; b=${hb#*:}
  python3 profile_sparse_decode.py --mla --heads $h --batch $b --context 32768 --fp8 \
    --out $OUT/profile_mla/h${h}_b${b}_32k_fp8.json 2>&1 | grep -v "Warning\|warn_once" | tee -a $OUT/profile_mla/lines.log
done
