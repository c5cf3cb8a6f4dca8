#!/usr/bin/env bash
# Real vLLM 0.26, 64K decode throughput with PDL on (shipped) and off (ASYNCTLS_PDL=0), standard step
# (part A) and lagged step (part B), in one session on one machine. The vLLM kit (.vllm-gpu/p1, p2)
# must be staged first; part A also installs p3.
PART=$1
if [ "$PART" = A ]; then
  bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
fi
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
E="python3 benchmarks/bench_vllm_e2e.py"
LAG=""; [ "$PART" = B ] && LAG="--lagged"
for pdl in on off; do
  O=$OUT/pdl_$pdl; mkdir -p $O
  if [ $pdl = off ]; then export ASYNCTLS_PDL=0; else unset ASYNCTLS_PDL; fi
  date
  timeout 170 $E --stage asynctls --budgets 2048 --contexts 65536 $LAG --out $O 2>&1 | grep -v -E "$F" | tail -1
  python3 -c "import json,glob; [print('$pdl', f, json.load(open(f))['rows'][0]['decode_tok_s'], json.load(open(f))['rows'][0]['ms_per_step']) for f in glob.glob('$O/tput_*.json')]"
done
