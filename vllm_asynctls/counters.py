"""Counters a user can read: how many decode tokens went sparse, and how many tokens each one read.

One `AsyncTLSCounters` per worker process (vLLM runs the model in a worker process; the counters
live there). Read them from the driver with

    from vllm_asynctls.counters import read_counters
    llm.collective_rpc(read_counters)   # one dict per worker; vLLM ships a callable to the
                                        # workers only with VLLM_ALLOW_INSECURE_SERIALIZATION=1

or set `VLLM_ASYNCTLS_COUNTERS_FILE=/path/counters.json` (e.g. under `vllm serve`): each worker
process then rewrites `/path/counters.json.<pid>` (atomically) after every scheduler step (that
snapshot reads the device accumulator: one host sync per step, only when the variable is set),
or `snapshot()` inside the worker process (e.g. VLLM_ENABLE_V1_MULTIPROCESSING=0). With the KV
offload on, the snapshot also carries the offload's `offload_*` metrics (hot-cache hit rate, bytes
copied per step, exposed copy time; see `vllm_asynctls.offload.prefetch.OffloadMetrics`). Request-level
counts are updated by the metadata builder once per scheduler step (host integers it already has);
the tokens the sparse path reads are summed into a tensor on the device of the KV cache, so the
decode path never synchronises with the host just to count. The GPU backend (decode in CUDA graphs)
counts requests but not reads: there `tokens_read_per_sparse_decode` is None.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import torch


COUNTERS_FILE_ENV = "VLLM_ASYNCTLS_COUNTERS_FILE"


class AsyncTLSCounters:
    """Decode tokens served sparse vs dense, and tokens read per decode token per kv head.

    A "decode token" is one sequence's one decode step (all layers); "tokens read" is per kv head and
    per layer, averaged over layers (the sparse path: sinks + local window + selected tokens that
    exist; the dense path: the whole context).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.steps_with_sparse = 0
        self.prefill_tokens = 0
        self.decode_tokens_sparse = 0
        self.decode_tokens_dense = 0
        self.dense_context_tokens = 0  # sum of context lengths of dense decode tokens
        self.sparse_context_tokens = 0  # sum of context lengths of sparse decode tokens
        self.max_sparse_decodes_per_step = 0  # most long requests decoding sparse in one step
        self._sparse_positions_read: torch.Tensor | None = None  # sum over (token, kv head, layer)
        self._sparse_row_layers = 0  # (token, kv head, layer) triples summed above
        offload = getattr(self, "_offload", None)
        if offload is not None:
            offload.reset()

    def attach_offload_metrics(self, metrics: Any) -> None:
        """The KV offload's `OffloadMetrics` (hit rate, bytes copied per step, exposed copy time): its
        `offload_*` entries join `snapshot()` and `reset()` resets it (attached by the offload connector)."""
        with self._lock:
            self._offload = metrics

    # --- updated by the metadata builder (host integers) ---------------------------------------
    def record_step(self, prefill_tokens: int, dense_context_lens: list[int], sparse_context_lens: list[int]) -> None:
        with self._lock:
            self.steps += 1
            self.prefill_tokens += prefill_tokens
            self.decode_tokens_dense += len(dense_context_lens)
            self.dense_context_tokens += sum(dense_context_lens)
            self.decode_tokens_sparse += len(sparse_context_lens)
            self.sparse_context_tokens += sum(sparse_context_lens)
            if sparse_context_lens:
                self.steps_with_sparse += 1
            self.max_sparse_decodes_per_step = max(self.max_sparse_decodes_per_step, len(sparse_context_lens))
        path = os.environ.get(COUNTERS_FILE_ENV)
        if path:
            self.dump(f"{path}.{os.getpid()}")

    def dump(self, path: str) -> None:
        """Write `snapshot()` as JSON, atomically (readers never see a half-written file)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(tmp, path)

    # --- updated by the impl (device tensor, no host sync) -------------------------------------
    def record_sparse_reads(self, positions: torch.Tensor) -> None:
        """positions: (B, Hkv, P) int32 attended positions of one layer's sparse tokens, -1 padded."""
        read = (positions >= 0).sum()
        with self._lock:
            if self._sparse_positions_read is None or self._sparse_positions_read.device != read.device:
                self._sparse_positions_read = torch.zeros((), dtype=torch.int64, device=read.device)
            self._sparse_positions_read += read
            self._sparse_row_layers += positions.shape[0] * positions.shape[1]

    # --- read ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            sparse_read = int(self._sparse_positions_read.item()) if self._sparse_positions_read is not None else 0
            decode = self.decode_tokens_sparse + self.decode_tokens_dense
            offload = getattr(self, "_offload", None)
            return ({"offload": False} if offload is None else {"offload": True, **offload.snapshot()}) | {
                "steps": self.steps,
                "steps_with_sparse": self.steps_with_sparse,
                "prefill_tokens": self.prefill_tokens,
                "decode_tokens_sparse": self.decode_tokens_sparse,
                "decode_tokens_dense": self.decode_tokens_dense,
                "sparse_share": self.decode_tokens_sparse / decode if decode else 0.0,
                # Tokens one decode token reads per kv head and layer; None where sparse decodes ran
                # but their reads were not counted (the GPU backend's decode, captured in CUDA graphs,
                # does not count them: per-layer counting kernels would cost the step time they report).
                "tokens_read_per_sparse_decode": sparse_read / self._sparse_row_layers
                if self._sparse_row_layers
                else (None if self.decode_tokens_sparse else 0.0),
                "context_per_sparse_decode": self.sparse_context_tokens / self.decode_tokens_sparse
                if self.decode_tokens_sparse
                else 0.0,
                "tokens_read_per_dense_decode": self.dense_context_tokens / self.decode_tokens_dense
                if self.decode_tokens_dense
                else 0.0,
                "max_sparse_decodes_per_step": self.max_sparse_decodes_per_step,
            }


COUNTERS = AsyncTLSCounters()


def snapshot() -> dict[str, Any]:
    """This process's counters."""
    return COUNTERS.snapshot()


def read_counters(worker: Any = None) -> dict[str, Any]:
    """For `llm.collective_rpc(read_counters)`: vLLM calls it with the worker as argument."""
    return COUNTERS.snapshot()


def reset_counters(worker: Any = None) -> None:
    """For `llm.collective_rpc(reset_counters)`."""
    COUNTERS.reset()
