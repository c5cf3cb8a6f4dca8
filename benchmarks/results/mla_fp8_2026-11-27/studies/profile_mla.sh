#!/usr/bin/env bash
# GPU machine (no vLLM needed): where the MLA operator's time goes at DeepSeek-V2-Lite shapes (16 heads), the
# decode batch of the throughput rows (B=16), 32K and 64K, bf16 and fp8 caches, standard and lagged; plus
# the copy bandwidth. One JSON of all rows and one log under $OUT/profile_mla (the device returns few files).
mkdir -p $OUT/profile_mla /tmp/prof
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
cd benchmarks
python3 -c "import bench_sparse_decode as b; print(f'copy bandwidth {b.copy_bandwidth() / 1e12:.2f} TB/s')" \
  | tee $OUT/profile_mla/all.log
for ctx in ${CONTEXTS:-32768 65536}; do
  for fp8 in "" --fp8; do
    for lag in "" --lagged; do
      tag=b16_${ctx}${fp8:+_fp8}${lag:+_lagged}
      echo "== $tag" | tee -a $OUT/profile_mla/all.log
      python3 profile_sparse_decode.py --mla --heads 16 --batch 16 --context $ctx $fp8 $lag --out /tmp/prof/$tag.json \
        2>&1 | tail -14 | tee -a $OUT/profile_mla/all.log
    done
  done
done
python3 -c "
import glob, json, os
rows = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob('/tmp/prof/*.json'))}
json.dump(rows, open('$OUT/profile_mla/rows.json', 'w'), indent=1)"
