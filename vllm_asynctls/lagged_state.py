"""Lagged selection inside vLLM: each decoding request's block choice, carried from one step to the next.

With `lagged_selection`, step t selects tokens inside the selection blocks step t-1 chose (the paper's
pipelining: on the GPU the block stage of step t then runs beside the token stage instead of before
it). The operator takes those blocks as `previous_block_ids`; this module keeps them between steps.

vLLM moves requests between batch rows from step to step, so the state is not kept per row. It is
kept per *selection-block slot of the paged cache*: step t records its choice at the slot of its newest
token, position L - 1, and step t + 1 reads it back from the slot of its position L - 2 (the same slot,
or the one before when a new selection block starts). Those slots sit in blocks the request owns:
the newest token's cache block is partly filled (never shared through the prefix cache), and the
previous one is either the same block or a full block only a request with the very same tokens shares.

An entry is used only if it was written at this step's L - 1 by a request with the same owner tag (the
physical block of position 0); otherwise (a request's first sparse decode step, a cache block freed by
one request and given to another) the row selects inside the `num_blocks` most recent selectable
blocks. Two requests share an owner tag only through the prefix cache; an entry one of them left in a
block the other reuses at the same length is then a hint from a request with the same prefix. Any
entry holds distinct ascending block ids from some block stage, so even a stale one only costs recall:
positions past the sequence are masked, and the sinks and the local window are always attended.

The rules are the reference's (`previous_block_ids` / `record_block_ids` in
`asynctls_tip_kernels.sparse_decode_reference`); on CUDA they run as one Triton launch each way
(`asynctls_tip_kernels.lagged_blocks`). Fixed shapes, no host synchronisation: the GPU backend's
decode stays capturable in CUDA graphs.
"""

from __future__ import annotations

import torch

from asynctls_tip_kernels import sparse_decode_reference as ref


class LaggedBlockState:
    """One layer's previous-step block choices, (num_cache_blocks * cache_block_size / S + 1, Hkv,
    num_blocks) int32, the length and owner tag that wrote each entry (`written`, -1: never written),
    and `hits`, the rows that used an entry (a diagnostic, on the device). The layout
    and its rules are the reference's (`previous_block_ids` / `record_block_ids` in
    `sparse_decode_reference`); on CUDA each step is one Triton launch each way (`lagged_blocks`)."""

    def __init__(self, num_cache_blocks: int, cache_block_size: int, num_kv_heads: int, config, device) -> None:
        S = config.selection_block_size
        if cache_block_size % S:
            raise ValueError(f"lagged selection: the cache block size ({cache_block_size}) must be a multiple "
                             f"of selection_block_size ({S})")
        self.config = config
        self.cache_block_size = cache_block_size
        slots = num_cache_blocks * (cache_block_size // S)
        self.block_ids = torch.full((slots + 1, num_kv_heads, config.num_blocks), -1, dtype=torch.int32,
                                    device=device)
        self.written = torch.full((slots + 1, 2), -1, dtype=torch.int32, device=device)
        self.hits = torch.zeros((), dtype=torch.int64, device=device)
        self._launch = None  # (previous, record) Triton launchers on CUDA, resolved once
        if self.block_ids.is_cuda:
            from asynctls_tip_kernels.lagged_blocks import previous_block_ids_triton, record_block_ids_triton

            self._launch = (previous_block_ids_triton, record_block_ids_triton)

    @property
    def nbytes(self) -> int:
        return self.block_ids.numel() * 4 + self.written.numel() * 4

    def recent_blocks(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """The fallback of rows without a usable entry: their most recent selectable blocks."""
        return ref.recent_block_ids(seq_lens, self.config, self.block_ids.shape[1])

    def previous(self, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """The blocks each row's previous step chose: (B, Hkv, num_blocks) int32, contiguous.
        block_table (B, W) int32, seq_lens (B,) int32 counting this step's token."""
        if self._launch is not None:
            return self._launch[0](self.block_ids, self.written, block_table, seq_lens, self.config,
                                   self.cache_block_size, hits=self.hits)
        return ref.previous_block_ids(self.block_ids, self.written, block_table, seq_lens, self.config,
                                      self.cache_block_size, hits=self.hits)

    def record(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_ids: torch.Tensor) -> None:
        """Keep this step's block choice (B, Hkv, num_blocks) for each row's next step. Padded rows
        (seq_len 0) write an entry no slot maps to."""
        if self._launch is not None:
            self._launch[1](self.block_ids, self.written, block_table, seq_lens, block_ids.contiguous(), self.config,
                            self.cache_block_size)
        else:
            ref.record_block_ids(self.block_ids, self.written, block_table, seq_lens, block_ids, self.config,
                                 self.cache_block_size)


def lagged_state_summary(model: torch.nn.Module) -> list[dict[str, int]]:
    """For `LLM.apply_model`: per attention layer with lagged state, the longest sequence length whose
    block choice it recorded (-1 if none) and how many decode rows used a recorded choice instead of
    the fallback; [] when lagged selection is off. A diagnostic."""
    summary = []
    for module in model.modules():
        layer_index = getattr(getattr(module, "impl", None), "layer_index", None)
        lagged = getattr(layer_index, "lagged", None)
        if lagged is not None:
            summary.append({"longest_recorded": int(lagged.written[:-1, 0].max()), "hits": int(lagged.hits)})
    return summary
