#!/usr/bin/env bash
# Real vLLM 0.26, 64K decode: where PDL costs the lagged step. Variants set by editing this machine's
# copy of kernels/sparse_decode.py (the package is installed editable): PDL off (ASYNCTLS_PDL=0), on for
# the token stream only, on for both streams; and the standard step on / off. Part A installs the kit's
# last part and runs the lagged variants; part B the standard ones.
# (The token_only variant used a temporary flag, PDL_PIPELINED_BLOCK_STREAM = False, that kept the
# block stream's launches out of PDL; not shipped: `kernels/sparse_decode.py` has no such flag now.)
PART=$1
if [ "$PART" = A ]; then
  bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
fi
source /tmp/vllm-env.sh
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
F='INFO|WARN|^\(Engine|Capturing|it/s\]|Warning|warn'
E="python3 benchmarks/bench_vllm_e2e.py"
if [ "$PART" = A ]; then VARIANTS="off token_only both"; LAG=--lagged; else VARIANTS="on off"; LAG=""; fi
for v in $VARIANTS; do
  O=$OUT/${PART}_$v; mkdir -p $O
  unset ASYNCTLS_PDL
  [ $v = off ] && export ASYNCTLS_PDL=0
  B=True; [ $v = token_only ] && B=False
  sed -i "s/^PDL_PIPELINED_BLOCK_STREAM = .*/PDL_PIPELINED_BLOCK_STREAM = $B/" kernels/sparse_decode.py
  grep "^PDL_" kernels/sparse_decode.py | tr '\n' ' '; echo "ASYNCTLS_PDL=${ASYNCTLS_PDL:-unset}"
  timeout 170 $E --stage asynctls --budgets 2048 --contexts 65536 $LAG --out $O 2>&1 | grep -v -E "$F" | tail -1
  python3 -c "import json,glob; [print('$v', f, *(round(json.load(open(f))['rows'][0][k], 4) for k in ('t_short_s', 't_long_s', 'ms_per_step', 'decode_tok_s'))) for f in glob.glob('$O/tput_*.json')]"
  rm -rf $O/models
done
