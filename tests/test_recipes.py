"""Every notebook in `recipes/` runs top to bottom with its default (CPU) settings; each asserts its own outcome.

The notebooks are executed with nbclient in a `python3` kernel whose working directory is `recipes/` (so their
figures land in `recipes/figures/`). A cell that raises, an `assert` included, fails the test with the cell's
traceback. Each notebook starts real vLLM engines, so these are `engine` tests (minutes, not seconds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NOTEBOOKS = sorted(RECIPES.glob("*.ipynb"))
CELL_TIMEOUT_S = 420

pytestmark = pytest.mark.engine


def _kernel_name() -> str:
    """`python3` if its kernelspec runs this interpreter's environment, else one installed for it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        argv0 = spec.argv[0]
        if argv0 in ("python", "python3", sys.executable) or Path(argv0).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(user=True, kernel_name="asynctls-tip-test", display_name="asynctls-tip test")
    return "asynctls-tip-test"


def test_notebooks_found():
    names = {p.name for p in NOTEBOOKS}
    assert {"distill_with_tip.ipynb", "long_context_serving.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_asserts_its_outcome(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: outputs not cleared"
    env_backup = dict(os.environ)
    # The kernel inherits this environment: offline hub, insecure serialization for counter reads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ["MPLBACKEND"] = "Agg"
    try:
        client = NotebookClient(
            nb,
            timeout=CELL_TIMEOUT_S,
            kernel_name=_kernel_name(),
            resources={"metadata": {"path": str(RECIPES)}},
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
