"""Shared fixtures: offline tiny models (built once per session) and one shared vLLM engine."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import tiny_models

# The Triton kernel tests compile for CUDA; on a machine without it they run under Triton's
# interpreter instead, in their own process (tests/test_triton_kernels_interpreted.py), because the
# interpreter must be switched on before Triton is first imported.
_KERNELS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ASYNCTLS_TEST_INTERPRET") == "1"
collect_ignore = [] if torch.cuda.is_available() or _KERNELS_INTERPRETED else ["test_triton_kernels.py"]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    root = os.environ.get("ASYNCTLS_TIP_TEST_CACHE")
    return root if root else str(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def qwen3_gqa_path(tiny_cache) -> str:
    """Tiny Qwen3 (8 q heads, 2 kv heads, head dim 64, float32, std-0.3 weights)."""
    return str(tiny_models.cached_model(tiny_models.QWEN3_GQA, tiny_cache))


@pytest.fixture(scope="session")
def deepseek_mla_path(tiny_cache) -> str:
    """Tiny DeepSeek-V3-family MLA model (latent 512 + rope 64, float32, std-0.3 weights)."""
    return str(tiny_models.cached_model(tiny_models.DEEPSEEK_MLA, tiny_cache))


@pytest.fixture(scope="session")
def teacher_student_paths(tiny_cache) -> tuple[str, str]:
    """(teacher, student) tiny Qwen3 folders sharing one tokenizer."""
    return (
        str(tiny_models.cached_model(tiny_models.QWEN3_TEACHER, tiny_cache)),
        str(tiny_models.cached_model(tiny_models.QWEN3_STUDENT, tiny_cache)),
    )
