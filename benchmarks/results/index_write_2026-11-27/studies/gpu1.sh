#!/usr/bin/env bash
# GPU machine, call 1 (no vLLM needed; stages the kit's first part on the side): the decode index write in one
# pass against the claim kernels (MLA and GQA), the GLM-style step with both wide plans, the chunked merge at
# large budgets. Writes $OUT (logs, and p.tgz with the JSON rows).
export PYTHONUNBUFFERED=1
S=benchmarks/results/index_write_2026-11-27/studies
bash .vllm-gpu/p1/install.sh .vllm-gpu/p1 > /dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
mkdir -p $OUT/p
prof() { name=$1; shift; timeout 150 python3 benchmarks/profile_sparse_decode.py "$@" --out $OUT/p/$name.json 2>&1 \
  | grep -v "Warning\|warn_once" | tee -a $OUT/profiles.log; }
prof mla16_b16_32k --mla --heads 16 --batch 16 --context 32768
prof glm20_b16_32k --mla --heads 20 --batch 16 --context 32768
prof gqa_b8_64k --batch 8 --context 65536
OUT=$OUT/p timeout 200 python3 $S/merge_ab.py 2>&1 | grep -v "Warning\|warn_once" | tee $OUT/merge_ab.log
prof gqa_b32_64k --batch 32 --context 65536
tar czf $OUT/p.tgz -C $OUT p && rm -r $OUT/p
