#!/usr/bin/env bash
# Ran on the device with a copy of the package at 7e07c93 in .baseline_kernels/e2e_old (`git archive 7e07c93 pyproject.toml kernels vllm_asynctls trl_tip README.md`), not kept in git.
# dense vs asynctls at 64K in real vLLM: current code with and without PDL, and the code of the last e2e rows (7e07c93)
bash .vllm-gpu/p3/install.sh .vllm-gpu/p3 | tail -1
source /tmp/vllm-env.sh
O=$OUT/e2e; mkdir -p $O
E="python3 benchmarks/bench_vllm_e2e.py"
F='INFO|WARN|^\(Engine|Capturing'
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARN | tail -1
timeout 140 $E --stage dense --contexts 65536 --out $O 2>&1 | grep -v -E "$F" | tail -2
for v in pdl nopdl; do
  mkdir -p $O/$v; cp $O/tput_dense.json $O/$v/
  if [ $v = nopdl ]; then export ASYNCTLS_PDL=0; fi
  timeout 140 $E --stage asynctls --budgets 2048 --contexts 65536 --out $O/$v 2>&1 | grep -v -E "$F" | tail -1
  unset ASYNCTLS_PDL
  $E --stage report --out $O/$v | tail -1
done
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .baseline_kernels/e2e_old 2>&1 | grep -v WARN | tail -1
mkdir -p $O/old; cp $O/tput_dense.json $O/old/
timeout 140 $E --stage asynctls --budgets 2048 --contexts 65536 --out $O/old 2>&1 | grep -v -E "$F" | tail -1
$E --stage report --out $O/old | tail -1
