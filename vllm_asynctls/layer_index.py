"""One attention layer's AsyncTLS index (block summaries + low-bit token index) beside vLLM's KV cache.

Shared by the CPU backend (`backend.py`, written with the plain-PyTorch reference) and the GPU backend
(`gpu_backend.py`, written with the fused Triton kernel inside vLLM's KV-cache update, so decode steps
captured in CUDA graphs write it too).

- Allocated at the first KV write from the cache's geometry (vLLM binds the KV cache after the model is
  built, so its block count is only known there), indexed by *physical* cache block.
- With `lagged_selection`, it also holds the previous step's block choices
  (`vllm_asynctls.lagged_state.LaggedBlockState`), addressed by the same physical blocks.
- Index channels are calibrated once per layer from the keys of the first real KV write (the first
  prefill chunk the engine serves): the channels with the largest mean |k| (or spread) per kv head,
  Double Sparsity's offline calibration done online; with an `index_calibration_file`
  (`vllm_asynctls.calibration`) they come from the file's entry for this decoder layer instead, at the
  same moment. With `index_basis="pca"` that first write calibrates each kv head's basis instead
  (`choose_index_basis`), with summaries and codes kept in it. vLLM's dummy runs (no attention metadata, or all
  slots -1) never calibrate. Calibration selects the valid rows with a data-dependent shape, which
  costs one host synchronisation per layer, once; it never runs while a CUDA graph is being captured.
"""

from __future__ import annotations

import logging

import torch

from asynctls_tip_kernels import sparse_decode_reference as ref

from vllm_asynctls.kernel_warmup import WarmOnce, fields_layout, row_layout, capturing as _capturing

logger = logging.getLogger("vllm.asynctls")  # under vLLM's logger: its handler, level and format


def _is_dummy_run() -> bool:
    """vLLM's profiling / warm-up runs carry no attention metadata; their keys are not real."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return not is_forward_context_available() or get_forward_context().attn_metadata is None


class LayerIndex:
    """One layer's `SparseIndex`, allocated at the first KV write and calibrated on the first real one."""

    def __init__(self, sparse_config, num_kv_heads: int, head_dim: int, is_mla: bool, calibration=None,
                 calibration_kv_heads=None) -> None:
        self.config = sparse_config
        # IndexCalibration from a file (checked against the model), or None; with it, the model's kv heads
        # this layer holds (all of them, or a tensor-parallel rank's share).
        self.calibration = calibration
        self.calibration_kv_heads = calibration_kv_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.is_mla = is_mla
        self.index: ref.SparseIndex | None = None
        self.calibrated = False
        self._write_workspace = None  # Triton path: the claim buffer, allocated with the index
        self._write_warmup = WarmOnce()  # Triton path: every writer variant compiled (`warm_write_index`)
        self.lagged = None  # LaggedBlockState with lagged_selection, allocated with the index

    def ensure(self, num_cache_blocks: int, cache_block_size: int, dtype: torch.dtype, device) -> ref.SparseIndex:
        idx = self.index
        if idx is not None and idx.block_min.shape[0] == num_cache_blocks and idx.block_min.device == device:
            return idx
        if _capturing():
            raise RuntimeError(
                "asynctls: the index would be allocated inside a CUDA graph capture; vLLM's warm-up runs "
                "should have allocated it first (run with enforce_eager=True and report this)"
            )
        self.index = ref.allocate_index(
            num_cache_blocks, cache_block_size, self.num_kv_heads, self.head_dim, self.config, dtype, device
        )
        if self.index.block_min.is_cuda:
            from asynctls_tip_kernels.index_write import IndexWriteWorkspace

            self._write_workspace = IndexWriteWorkspace(
                num_cache_blocks, self.index.block_min.shape[1], self.index.block_min.device
            )
        if self.config.lagged_selection:
            from vllm_asynctls.lagged_state import LaggedBlockState

            self.lagged = LaggedBlockState(num_cache_blocks, cache_block_size, self.num_kv_heads, self.config, device)
        self.calibrated = False
        nbytes = sum(t.numel() * t.element_size() for t in (self.index.block_min, self.index.block_max,
                                                           self.index.block_scale, self.index.codes,
                                                           self.index.scales) if t is not None)
        nbytes += self.lagged.nbytes if self.lagged is not None else 0
        logger.info(
            "asynctls: index for %d cache blocks x %d tokens (%d kv heads, key dim %d): %.1f MiB per layer",
            num_cache_blocks, cache_block_size, self.num_kv_heads, self.head_dim, nbytes / 2**20,
        )
        return self.index

    def previous_blocks(self, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor | None:
        """The decode rows' previous block choices for lagged selection (None when it is off)."""
        return None if self.lagged is None else self.lagged.previous(block_table, seq_lens)

    def record_blocks(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_ids: torch.Tensor) -> None:
        """Keep this step's block choices for the rows' next step (no-op when lagged selection is off)."""
        if self.lagged is not None:
            self.lagged.record(block_table, seq_lens, block_ids)

    def _calibrate(self, key: torch.Tensor, key_tail: torch.Tensor | None, slot_mapping: torch.Tensor,
                   layer_name: str | None) -> None:
        if self.calibration is not None:
            if layer_name is None:
                raise RuntimeError("asynctls: a layer with an index calibration file was written without its name")
            from vllm_asynctls.calibration import layer_number

            ref.set_index_channels(self.index, self.calibration.channels(
                layer_number(layer_name), self.calibration_kv_heads, device=self.index.channel_ids.device))
            self.calibrated = True
            return
        if key_tail is not None:
            key = torch.cat([key, key_tail], dim=-1)
        valid = slot_mapping >= 0
        calib = key[valid]  # data-dependent shape: once per layer, never inside a graph capture
        if calib.shape[0] > 0:
            ref.calibrate_index(self.index, calib, self.config)
            self.calibrated = True

    def write(self, key: torch.Tensor, slot_mapping: torch.Tensor, layer_name: str | None = None,
              key_tail: torch.Tensor | None = None) -> None:
        """key (N, Hkv, D), possibly padded past slot_mapping's length; slot_mapping (N,) (negative =
        padding); layer_name: vLLM's name of the attention layer (needed with a calibration file);
        key_tail (N, Hkv, P): the keys' last P channels when they come in two parts (MLA); the GPU writer
        reads both parts of calls of at most 256 tokens without a basis, and joins them for the rest."""
        n = min(key.shape[0], slot_mapping.shape[0])
        key, slot_mapping = key[:n], slot_mapping[:n]
        key_tail = None if key_tail is None else key_tail[:n]
        needs_calibration = self.config.index_bits != 16 or self.config.index_basis == "pca"
        if not self.calibrated and needs_calibration and not _capturing() and not _is_dummy_run():
            self._calibrate(key, key_tail, slot_mapping, layer_name)
        if self._write_workspace is not None:
            from asynctls_tip_kernels.index_write import warm_write_index, write_index_triton

            # vLLM's warm-up runs reach here first (CUDA graphs: before capture), so prefill sizes their
            # graphs never run do not compile while serving.
            self._write_warmup(
                lambda: ("index_write", self.config, str(key.device), row_layout(key), row_layout(key_tail),
                         fields_layout(self.index)),
                lambda: warm_write_index(self.index, key, self.config, self._write_workspace, key_tail=key_tail))
            write_index_triton(self.index, key, slot_mapping.to(torch.int64), self.config,
                               workspace=self._write_workspace, key_tail=key_tail)
        else:
            if key_tail is not None:
                key = torch.cat([key, key_tail], dim=-1)
            ref.write_index(self.index, key, slot_mapping, self.config)
