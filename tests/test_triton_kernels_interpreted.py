"""The Triton kernel tests on a machine without CUDA (CI): `tests/test_triton_kernels.py` runs under
Triton's interpreter in a child pytest, so every kernel's logic (indexing, masks, the top-k search,
the split-K merge) is checked against the reference on every CI run, not only on the GPU machine.

The interpreter must be on before Triton is first imported, which other tests of this session
already did: hence the child process. With CUDA the compiled tests run directly instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = Path(__file__).with_name("test_triton_kernels.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, tests/test_triton_kernels.py runs compiled")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", ASYNCTLS_TEST_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(KERNEL_TESTS)],
        cwd=KERNEL_TESTS.parent.parent, env=env, capture_output=True, text=True, timeout=1500,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"kernel tests under the interpreter failed ({summary}):\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary, summary
