"""The GPU backends' decode workspaces: one `SparseDecodeWorkspace` per decode batch size, all carved
from one arena per engine (their steps never overlap), so CUDA graphs of every captured size cost one
workspace of memory. Also the attention warm-up both GPU impls run once per layer, and the per-step counting
both GPU builders share."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, WorkspaceArena, warm_decode_attention

from vllm_asynctls.counters import COUNTERS
from vllm_asynctls.kernel_warmup import WarmOnce, row_layout

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("vllm.asynctls")  # under vLLM's logger: its handler, level and format


class DecodeWorkspaces:
    """Workspaces by batch size. `workspace_args(batch, width)` gives `SparseDecodeWorkspace`'s
    arguments for a batch of `batch` rows and a block table `width` columns wide; `kv_dtype`: the KV
    cache's dtype (vLLM's `kv_cache_spec.dtype`: an fp8 cache's attention takes another split count). The
    arena is sized at the first call for every batch up to `max_batch` (vLLM builds metadata before any
    capture)."""

    def __init__(self, workspace_args: Callable[[int, int], tuple], max_batch: int, device, label: str,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.workspace_args = workspace_args
        self.kv_dtype = kv_dtype
        self.max_batch = max_batch
        self.device = device
        self.label = label
        self._arena: WorkspaceArena | None = None
        self._width = -1
        self._by_batch: dict[int, SparseDecodeWorkspace] = {}

    def get(self, batch: int, width: int) -> SparseDecodeWorkspace:
        if width != self._width:
            if self._arena is not None:
                raise RuntimeError(
                    f"asynctls: the block table is {width} columns wide, not {self._width} as when the decode "
                    f"workspaces were sized; captured CUDA graphs still use the old ones, so they are not resized"
                )
            nbytes = max(WorkspaceArena.required_bytes(*self.workspace_args(b, width), kv_dtype=self.kv_dtype)
                         for b in range(1, max(self.max_batch, batch) + 1))
            self._arena = WorkspaceArena(nbytes, self.device)
            self._width = width
            self._by_batch.clear()
            logger.info("asynctls%s: decode workspace arena %.1f MiB for batches up to %d",
                        self.label, nbytes / 2**20, self.max_batch)
        ws = self._by_batch.get(batch)
        if ws is None:
            ws = SparseDecodeWorkspace(*self.workspace_args(batch, width), empty=self._arena.carver(),
                                       kv_dtype=self.kv_dtype)
            self._by_batch[batch] = ws
        return ws


class DecodeAttentionWarmup:
    """One layer's attention warm-up: at its first decode outside a CUDA-graph capture, `warm_decode_attention`
    compiles the attention variant of every decode batch up to `max_batch`, so that a step mixing prefill and
    decode rows (run outside any graph, at any number of decode rows) does not compile one while serving.
    That first decode is vLLM's warm-up run before capture under full CUDA graphs (`cudagraph_mode` FULL or
    FULL_AND_PIECEWISE, the default); with `enforce_eager` or PIECEWISE graphs it is the first decode served,
    which then pays the compiles (seconds with an empty Triton cache). Later calls, and calls while
    capturing, do nothing; so do the other layers' first calls once a layer warmed the same layouts
    (`WarmOnce`)."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self._once = WarmOnce()

    def __call__(self, query, key_cache, value_cache, block_table, config, scale: float, kv_scales=None) -> None:
        self._once(lambda: ("decode_attention", self.max_batch, config, kv_scales is None, str(query.device),
                            *map(row_layout, (query, key_cache, value_cache, block_table))),
                   lambda: warm_decode_attention(query, key_cache, value_cache, block_table, config, scale,
                                                 self.max_batch, kv_scales))


def max_decode_batch(vllm_config) -> int:
    """The largest decode batch a step can carry: max_num_seqs, or a larger CUDA-graph capture size."""
    return max(vllm_config.scheduler_config.max_num_seqs, vllm_config.compilation_config.max_cudagraph_capture_size or 0)


def count_gpu_step(cm, num_decodes: int) -> None:
    """Counters of a GPU step (every decode row sparse), from host tensors vLLM already has (no device
    read). Padded rows hold 0."""
    lens = getattr(cm, "seq_lens_cpu_upper_bound", None)
    if lens is None:
        return
    qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
    decode_lens = lens[:num_decodes]
    COUNTERS.record_step(
        prefill_tokens=int(qsl[-1] - qsl[num_decodes]),
        dense_context_lens=[],
        sparse_context_lens=decode_lens[decode_lens > 0].tolist(),
    )
