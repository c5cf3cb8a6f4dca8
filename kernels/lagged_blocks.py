"""Lagged selection's state between decode steps, on the GPU: one launch reads each row's previous block
choice (or its fallback), one launch records this step's.

Same results as the reference's `previous_block_ids` / `record_block_ids` (read the layout note above
them in `sparse_decode_reference.py`). Written as two one-program-per-row kernels because the torch
version is some twenty small launches per layer and step, which inside a CUDA graph would cost more
than the pipelining saves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attention import require_triton_device


@triton.jit
def _lagged_slot(table_ptr, row, stride_t, pos, CBS: tl.constexpr, SBS: tl.constexpr):
    block = tl.load(table_ptr + row * stride_t + pos // CBS).to(tl.int64)
    return block * (CBS // SBS) + (pos % CBS) // SBS


@triton.jit
def _previous_block_ids_kernel(
    state_ptr,  # int32, (num_slots + 1, HKV, NB) contiguous
    written_ptr,  # int32, (num_slots + 1, 2) contiguous: length and owner of each entry
    table_ptr,  # int32, (B, W), row stride stride_t
    seq_lens_ptr,  # int32, (B,)
    out_ptr,  # int32, (B, HKV, NB) contiguous
    hits_ptr,  # int64 scalar: rows that used an entry (only if HITS)
    stride_t,
    HITS: tl.constexpr,
    HKV: tl.constexpr,
    NB: tl.constexpr,
    CBS: tl.constexpr,
    SBS: tl.constexpr,
    LOCAL: tl.constexpr,
    BLOCK: tl.constexpr,  # >= HKV * NB
):
    row = tl.program_id(0).to(tl.int64)
    L = tl.load(seq_lens_ptr + row).to(tl.int64)
    slot = _lagged_slot(table_ptr, row, stride_t, tl.maximum(L - 2, 0), CBS, SBS)
    owner = tl.load(table_ptr + row * stride_t)
    valid = (L >= 2) & (tl.load(written_ptr + 2 * slot) == L - 1) & (tl.load(written_ptr + 2 * slot + 1) == owner)
    if HITS:
        tl.atomic_add(hits_ptr, valid.to(tl.int64))
    offs = tl.arange(0, BLOCK)
    m = offs < HKV * NB
    kept = tl.load(state_ptr + slot * (HKV * NB) + offs, mask=m, other=-1)  # slot is in range either way
    # Fallback: the NB blocks ending the selectable range [sink, L - LOCAL) (floor division by hand:
    # Triton's integer division truncates toward zero).
    x = L - LOCAL - 1
    last = tl.where(x >= 0, x // SBS, -1)
    ids = tl.maximum(last - NB + 1, 0) + (offs % NB)
    recent = tl.where(ids <= last, ids, -1)
    tl.store(out_ptr + row * (HKV * NB) + offs, tl.where(valid, kept, recent).to(tl.int32), mask=m)


@triton.jit
def _record_block_ids_kernel(
    state_ptr, written_ptr, table_ptr, seq_lens_ptr,
    ids_ptr,  # int32, (B, HKV, NB) contiguous
    stride_t,
    DISCARD,  # int: the entry padded rows write
    HKV: tl.constexpr,
    NB: tl.constexpr,
    CBS: tl.constexpr,
    SBS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    L = tl.load(seq_lens_ptr + row).to(tl.int64)
    slot = _lagged_slot(table_ptr, row, stride_t, tl.maximum(L - 1, 0), CBS, SBS)
    slot = tl.where(L > 0, slot, DISCARD)
    offs = tl.arange(0, BLOCK)
    m = offs < HKV * NB
    tl.store(state_ptr + slot * (HKV * NB) + offs, tl.load(ids_ptr + row * (HKV * NB) + offs, mask=m), mask=m)
    tl.store(written_ptr + 2 * slot, L.to(tl.int32))
    tl.store(written_ptr + 2 * slot + 1, tl.load(table_ptr + row * stride_t))


def _check(state_ids, written, block_table, seq_lens):
    require_triton_device("lagged block ids", state_ids, block_table)
    if state_ids.dtype != torch.int32 or state_ids.dim() != 3 or not state_ids.is_contiguous():
        raise ValueError(f"state_ids must be contiguous int32 (num_slots + 1, Hkv, num_blocks); got "
                         f"{state_ids.dtype} {tuple(state_ids.shape)}")
    if written.dtype != torch.int32 or written.shape != (state_ids.shape[0], 2) or not written.is_contiguous():
        raise ValueError(f"written must be contiguous int32 ({state_ids.shape[0]}, 2); got {written.dtype} "
                         f"{tuple(written.shape)}")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32 or block_table.stride(1) != 1 \
            or seq_lens.shape != block_table.shape[:1]:
        raise ValueError(f"block_table must be int32 (B, W) with unit column stride and seq_lens int32 (B,); got "
                         f"{block_table.dtype} {tuple(block_table.shape)}, {seq_lens.dtype} {tuple(seq_lens.shape)}")


def previous_block_ids_triton(state_ids: torch.Tensor, written: torch.Tensor, block_table: torch.Tensor,
                              seq_lens: torch.Tensor, config, cache_block_size: int, hits: torch.Tensor | None = None,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """`sparse_decode_reference.previous_block_ids` in one launch -> (B, Hkv, num_blocks) int32."""
    _check(state_ids, written, block_table, seq_lens)
    if hits is not None and (hits.dtype != torch.int64 or hits.numel() != 1):
        raise ValueError(f"hits must be one int64; got {hits.dtype} {tuple(hits.shape)}")
    B, (_, Hkv, NB) = block_table.shape[0], state_ids.shape
    if out is None:
        out = torch.empty(B, Hkv, NB, dtype=torch.int32, device=state_ids.device)
    if B:
        _previous_block_ids_kernel[(B,)](
            state_ids, written, block_table, seq_lens, out, hits if hits is not None else out,
            block_table.stride(0), HITS=hits is not None, HKV=Hkv, NB=NB, CBS=cache_block_size, SBS=config.selection_block_size, LOCAL=config.local_tokens,
            BLOCK=triton.next_power_of_2(Hkv * NB), num_warps=1,
        )
    return out


def record_block_ids_triton(state_ids: torch.Tensor, written: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, block_ids: torch.Tensor, config, cache_block_size: int) -> None:
    """`sparse_decode_reference.record_block_ids` in one launch (in place)."""
    _check(state_ids, written, block_table, seq_lens)
    B, (_, Hkv, NB) = block_table.shape[0], state_ids.shape
    if block_ids.shape != (B, Hkv, NB) or block_ids.dtype != torch.int32 or not block_ids.is_contiguous():
        raise ValueError(f"block_ids must be contiguous int32 {(B, Hkv, NB)}; got {block_ids.dtype} "
                         f"{tuple(block_ids.shape)}")
    if B:
        _record_block_ids_kernel[(B,)](
            state_ids, written, block_table, seq_lens, block_ids, block_table.stride(0), state_ids.shape[0] - 1,
            HKV=Hkv, NB=NB, CBS=cache_block_size, SBS=config.selection_block_size,
            BLOCK=triton.next_power_of_2(Hkv * NB), num_warps=1,
        )
