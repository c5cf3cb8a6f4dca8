#!/usr/bin/env bash
# Real vLLM 0.26, 64K decode throughput with every decode length timed 5 times (medians and the spread
# of the per-repeat rates): dense, asynctls@2048, lagged. Installs the vLLM kit's last part if needed.
[ -f /tmp/vllm-env.sh ] || bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
E="python3 benchmarks/bench_vllm_e2e.py"
O=$OUT/e2e; mkdir -p $O
for s in "dense" "asynctls" "asynctls --lagged"; do
  timeout 170 $E --stage $s --budgets 2048 --contexts 65536 --repeats 5 --out $O 2>&1 | grep -v -E "$F" | tail -1
done
rm -rf $O/models
python3 -c "
import json, glob
for f in sorted(glob.glob('$O/tput_*.json')):
    r = json.load(open(f))['rows'][0]
    print(f.split('/')[-1], r['requests'], round(r['decode_tok_s']), round(r['ms_per_step'], 2), [round(x, 2) for x in r['ms_per_step_runs']])
"
$E --stage report --out $O
