"""Every notebook in `recipes/` runs top to bottom with its default (CPU) settings; each asserts its own outcome.

The notebooks are executed with nbclient in a `python3` kernel whose working directory is `recipes/` (so their
figures land in `recipes/figures/`). A cell that raises, an `assert` included, fails the test with the cell's
traceback. Each notebook starts real vLLM engines, so those are `engine` tests (minutes, not seconds). The glue
between a trainer and a server (`ServerRollouts`' contract with TRL and the server, `reload_weights`' preconditions)
is tested here in seconds, with fakes in place of the server and the trainer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NOTEBOOKS = sorted(RECIPES.glob("*.ipynb"))
# A cell may start several 30-layer servers (the budget sweep: one start each, about a minute on a 2-core CPU).
CELL_TIMEOUT_S = 600


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
    expected = {"distill_with_tip.ipynb", "long_context_serving.ipynb", "long_rollouts_for_distillation.ipynb"}
    assert expected <= names, names


@pytest.mark.engine
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


def test_reload_weights_needs_dev_mode_and_a_safetensors_folder(tmp_path):
    from vllm_asynctls.recipes_support import OpenAIServer

    with pytest.raises(RuntimeError, match="dev_mode=True"):
        OpenAIServer("some-model", workdir=tmp_path).reload_weights(tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        OpenAIServer("some-model", workdir=tmp_path, dev_mode=True).reload_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match="not running"):
        OpenAIServer("some-model", workdir=tmp_path, dev_mode=True).reload_weights(tmp_path)


class _FakeServer:
    """What `ServerRollouts` needs from a server: `complete_ids` and `reload_weights`, recorded."""

    def __init__(self):
        self.requests, self.reloads = [], []

    def complete_ids(self, prompt_ids, max_tokens, **sampling):
        self.requests.append((prompt_ids, max_tokens, sampling))
        return [[7] * (i + 1) for i in range(len(prompt_ids))]

    def reload_weights(self, folder):
        self.reloads.append(sorted(p.name for p in Path(folder).iterdir()))
        return 0.01


def _fake_trainer(model, **args):
    accelerator = SimpleNamespace(num_processes=1, unwrap_model=lambda m: m)
    defaults = dict(use_vllm=False, max_completion_length=5, temperature=0.7, top_p=0.9, top_k=0, min_p=None,
                    repetition_penalty=1.0)
    return SimpleNamespace(args=SimpleNamespace(**{**defaults, **args}), accelerator=accelerator, model=model)


def test_server_rollouts_follow_trls_generation_contract(tmp_path):
    """Attached to a trainer, `ServerRollouts` is TRL's `vllm_generation`: `sync_weights` saves the trainer's model and
    has the server reload that folder; `generate` sends the prompts' token ids with the trainer's sampling settings
    and returns TRL's 4-tuple."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_tip.recipes_support import ServerRollouts

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    trainer = _fake_trainer(LlamaForCausalLM(config))
    server = _FakeServer()
    rollouts = ServerRollouts(server, tmp_path / "weights").attach(trainer)
    assert trainer.vllm_generation is rollouts and trainer.use_vllm and trainer._last_loaded_step == -1

    rollouts.sync_weights()
    assert server.reloads == [["config.json", "generation_config.json", "model.safetensors"]]

    prompts = [[1, 2, 3], [4, 5]]
    prompt_ids, completion_ids, logprobs, logprob_ids = rollouts.generate(prompts, None, 1)
    assert prompt_ids == prompts and completion_ids == [[7], [7, 7]] and logprobs is None and logprob_ids is None
    sent_prompts, max_tokens, sampling = server.requests[0]
    assert sent_prompts == prompts and max_tokens == 5
    assert sampling == dict(temperature=0.7, top_p=0.9, top_k=0, min_p=None, repetition_penalty=1.0)
    assert rollouts.prompt_tokens == [5] and rollouts.completion_tokens == [3]
    with pytest.raises(NotImplementedError, match="num_generations"):
        rollouts.generate(prompts, None, 2)


def test_server_rollouts_refuse_a_trainer_with_its_own_engine(tmp_path):
    from trl_tip.recipes_support import ServerRollouts

    with pytest.raises(ValueError, match="use_vllm=False"):
        ServerRollouts(_FakeServer(), tmp_path).attach(_fake_trainer(None, use_vllm=True))


def test_recipe_plots_say_reads_were_not_counted(tmp_path):
    # The GPU backend counts sparse decodes but not their reads (`tokens_read_per_sparse_decode` None):
    # the recipes' plots must still draw, without the reads, instead of failing on None.
    import matplotlib

    matplotlib.use("Agg")
    from vllm_asynctls.recipes_support import ServedRun, plot_budget_sweep

    counters = {"tokens_read_per_sparse_decode": None, "context_per_sparse_decode": 2000.0}
    dense = ServedRun("dense", None, scores=[1.0, 0.0])
    sparse = [ServedRun("asynctls", b, scores=[1.0, 1.0], counters=dict(counters)) for b in (64, 128)]
    fig = plot_budget_sweep(dense, sparse, 2000.0, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert "reads not counted on this backend" in [t.get_text() for t in fig.axes[1].texts]
