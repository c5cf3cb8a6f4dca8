"""`HotBlockCache`: per request and kv head, `hot_blocks` GPU-resident slots holding host blocks.

State (all device tensors, fixed shapes, updated in place without host syncs, so a decode step that
uses it can be captured in a CUDA graph):

    key, value   (L, R * Hkv * S, block_size, 1, D)  slot contents; slot id g = (row * Hkv + h) * S + s.
                 Per layer this is the reference cache layout (blocks, block_size, Hkv=1, D) with the
                 kv heads folded into the batch (`fold_heads`), so any paged attention kernel reads it.
    block_slot   (L, R, Hkv, W + 1) int32  logical block -> global slot id, -1 when not resident.
                 Its first W columns are the attention block table; column W is a write sink.
    slot_block   (L, R, Hkv, S + 1) int32  global view back: logical block held by each slot, -1 free.
    last_used    (L, R, Hkv, S + 1) int64  stamp of the last step that used the slot; -1 free,
                 PINNED (int64 max) for sink / local blocks (never evicted). Column S is a sink.
    clock        (1,) int64 the step stamp, advanced on the device (`advance`): demand uses
                 `2 * step`, prefetch `2 * step - 1`, so a block prefetched for this step but not
                 used goes before a block used by this step, and both after anything older.
    counters     (L, 4) int64 lookups, hits, copied blocks, overflow (a miss that found no evictable
                 slot: impossible when `hot_blocks >= pinned_blocks + max_blocks_per_step`, which the
                 constructor checks; counted, never silently wrong).

Eviction: a step's misses take the slots with the smallest `last_used` (free first, then least
recently used); slots used by this step and pinned slots come last, so they are never chosen while
the invariant holds. Fixed-size: argsort over the S slots and a cumulative-sum rank of the misses.
Masked entries are written to the sink columns instead of branching.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HotBlockCache", "fold_heads", "unfold_output", "needed_blocks", "PINNED"]

PINNED = torch.iinfo(torch.int64).max
_BIG = torch.iinfo(torch.int32).max


def needed_blocks(positions: Tensor, block_size: int) -> Tensor:
    """(B, Hkv, P) attended positions, -1 padded -> (B, Hkv, P) logical blocks, -1 padded (duplicates
    allowed: `HotBlockCache.resolve` dedupes)."""
    return torch.where(positions >= 0, positions // block_size, torch.full_like(positions, -1))


def fold_heads(query: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the hot cache treats each (sequence, kv head) as a sequence with one kv head.

    query (B, Hq, D) -> (B * Hkv, G, D); positions (B, Hkv, P) -> (B * Hkv, 1, P)."""
    B, Hq, D = query.shape
    Hkv = positions.shape[1]
    return query.reshape(B * Hkv, Hq // Hkv, D), positions.reshape(B * Hkv, 1, -1).contiguous()


def unfold_output(out: Tensor, batch: int) -> Tensor:
    """(B * Hkv, G, Dv) -> (B, Hq, Dv)."""
    return out.reshape(batch, -1, out.shape[-1])


def _dedupe(blocks: Tensor) -> Tensor:
    """(..., N) int32 -1 padded -> same shape, each block once per row (sorted, pads last)."""
    s = torch.where(blocks >= 0, blocks, _BIG).sort(dim=-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    return torch.where(dup | (s == _BIG), -1, s)


class HotBlockCache:
    """GPU hot cache of host blocks (layout in the module doc).

    num_layers L, max_requests R (rows), num_kv_heads Hkv, hot_blocks S (slots per request and kv
    head), block_size, head_dim D, max_blocks_per_seq W (block table width: ceil(max_model_len /
    block_size)), pinned_blocks (sink + local blocks kept per request and head),
    max_blocks_per_step (distinct blocks one step reads per head, pinned ones included).
    """

    def __init__(self, num_layers: int, max_requests: int, num_kv_heads: int, hot_blocks: int, block_size: int,
                 head_dim: int, max_blocks_per_seq: int, pinned_blocks: int, max_blocks_per_step: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 allocate_storage: bool = True) -> None:
        if hot_blocks < max_blocks_per_step + pinned_blocks:
            raise ValueError(
                f"offload_hot_blocks must be >= the blocks one step reads per kv head ({max_blocks_per_step}) "
                f"+ the pinned sink/local blocks ({pinned_blocks}) = {max_blocks_per_step + pinned_blocks}; "
                f"got {hot_blocks}. Raise offload_hot_blocks or lower token_budget"
            )
        L, R, H, S, W = num_layers, max_requests, num_kv_heads, hot_blocks, max_blocks_per_seq
        self.num_layers, self.max_requests, self.num_kv_heads = L, R, H
        self.hot_blocks, self.block_size, self.head_dim, self.max_blocks_per_seq = S, block_size, head_dim, W
        self.device = torch.device(device)
        self.dtype = dtype
        # Slot contents: one (R * H * S, block_size, 1, D) tensor per layer for K and for V. Either
        # allocated here, or bound later to memory the caller owns (`bind_storage`: inside vLLM, KV
        # cache blocks the scheduler reserved for the hot caches, so they count in its budget).
        self.key: list[Tensor] | Tensor | None = None
        self.value: list[Tensor] | Tensor | None = None
        if allocate_storage:
            self.key = torch.zeros(L, R * H * S, block_size, 1, head_dim, dtype=dtype, device=device)
            self.value = torch.zeros_like(self.key)
        self.block_slot = torch.full((L, R, H, W + 1), -1, dtype=torch.int32, device=device)
        self.slot_block = torch.full((L, R, H, S + 1), -1, dtype=torch.int32, device=device)
        self.last_used = torch.full((L, R, H, S + 1), -1, dtype=torch.int64, device=device)
        self.last_used[..., S] = PINNED  # the sink column never looks evictable
        self.clock = torch.zeros(1, dtype=torch.int64, device=device)
        self.counters = torch.zeros(L, 4, dtype=torch.int64, device=device)
        self._heads = torch.arange(H, device=device).view(1, H, 1)
        self._minus_one = torch.full((), -1, dtype=torch.int32, device=device)
        self._layer_rows = torch.arange(L, device=device, dtype=torch.int64) * R
        self._slot_base = (torch.arange(R * H, device=device, dtype=torch.int64) * S).view(R, H)

    @property
    def slot_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer's K (or V) slots: (R * Hkv * S, block_size, 1, D)."""
        return (self.max_requests * self.num_kv_heads * self.hot_blocks, self.block_size, 1, self.head_dim)

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        slots = self.max_requests * self.num_kv_heads * self.hot_blocks
        return self.num_layers * 2 * slots * self.block_size * self.head_dim * itemsize

    def bind_storage(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Use caller-owned memory for the slot contents: per layer a K and a V tensor of
        `slot_shape`, this cache's dtype and device (any strides)."""
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"HotBlockCache.bind_storage: {self.num_layers} layers expected; got "
                             f"{len(keys)} key and {len(values)} value tensors")
        for t in (*keys, *values):
            if tuple(t.shape) != self.slot_shape or t.dtype != self.dtype or t.device != self.device:
                raise ValueError(f"HotBlockCache.bind_storage: each tensor must be {self.slot_shape} "
                                 f"{self.dtype} on {self.device}; got {tuple(t.shape)} {t.dtype} on {t.device}")
        self.key, self.value = list(keys), list(values)

    def advance(self) -> None:
        """Start a new step (device op: graph-capturable)."""
        self.clock += 1

    def demand_stamp(self) -> Tensor:
        return self.clock * 2

    def prefetch_stamp(self) -> Tensor:
        return self.clock * 2 - 1

    def reset_rows(self, rows: Tensor) -> None:
        """Forget rows (request finished or newly admitted)."""
        self.block_slot[:, rows] = -1
        self.slot_block[:, rows] = -1
        self.last_used[:, rows, :, : self.hot_blocks] = -1

    # ------------------------------------------------------------------------------------------
    def resolve(self, layer: int | None, rows: Tensor, blocks: Tensor, stamp: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Make `blocks` resident: hits are touched, misses get slots (evicting LRU).

        layer: one layer, or None for every layer at once (then `blocks` has a leading (L,) dim and so
        do the returns: one set of small kernels per step instead of one per layer).
        rows: (B,) int64 cache rows of the batch's requests; blocks: (B, Hkv, N) int32 logical blocks,
        -1 padded, duplicates allowed; stamp: this use's stamp (`demand_stamp()`, `prefetch_stamp()`, or
        PINNED to pin). Returns (blocks (B, Hkv, N) deduped, miss (B, Hkv, N) bool, dst (B, Hkv, N)
        int64 slot of each block within its layer). The caller copies the missed blocks into `dst`; the
        mapping already points at them, so the copy must land before attention reads it.
        """
        S, W, H, R = self.hot_blocks, self.max_blocks_per_seq, self.num_kv_heads, self.max_requests
        rows = rows.long()
        if layer is None:
            # Fold (layer, row) into one row index over (L * R) views of the state.
            L, B, N = blocks.shape[0], blocks.shape[1], blocks.shape[-1]
            bs = self.block_slot.view(L * R, H, W + 1)
            sb = self.slot_block.view(L * R, H, S + 1)
            lu = self.last_used.view(L * R, H, S + 1)
            state_rows = (self._layer_rows[:L].unsqueeze(1) + rows.unsqueeze(0)).reshape(-1)  # (L * B,)
            base_rows = rows.repeat(L)
            blocks = blocks.reshape(L * B, H, N)
        else:
            bs = self.block_slot[layer]  # (R, Hkv, W + 1)
            sb = self.slot_block[layer]  # (R, Hkv, S + 1)
            lu = self.last_used[layer]  # (R, Hkv, S + 1)
            state_rows = base_rows = rows
        blocks = _dedupe(blocks)
        r = state_rows.view(-1, 1, 1)
        h = self._heads
        valid = blocks >= 0
        col = torch.where(valid, blocks, W).long()  # (B, Hkv, N), pads -> sink column
        slot = bs[r, h, col]  # (B, Hkv, N) slot or -1
        hit = valid & (slot >= 0)
        miss = valid & (slot < 0)
        base = self._slot_base[base_rows].unsqueeze(-1)  # (B, Hkv, 1)
        stamp_t = torch.as_tensor(stamp, dtype=torch.int64, device=blocks.device)

        # Touch hits (a pinned slot stays pinned unless this use pins it anew).
        local = torch.where(hit, slot.long() - base, S)  # (B, Hkv, N)
        lu[r, h, local] = torch.where(hit, torch.maximum(lu[r, h, local], stamp_t), PINNED)

        # Victims: the k-th miss of a row takes the row's k-th least recently used slot.
        order = lu[state_rows, :, :S].argsort(dim=-1)  # (B, Hkv, S)
        rank = (miss.cumsum(dim=-1) - 1).clamp(0, S - 1)
        victim = order.gather(-1, rank)  # (B, Hkv, N) local slot
        victim_stamp = lu[r, h, victim]
        overflow = miss & (victim_stamp >= stamp_t)  # would evict a block this step uses
        vcol = torch.where(miss, victim, S)
        old = sb[r, h, vcol]  # block being evicted, -1 if the slot was free
        # A device tensor, not the scalar -1: a scalar value is a host copy, illegal under graph capture.
        bs[r, h, torch.where(miss & (old >= 0), old, W).long()] = self._minus_one
        dst = base + victim  # (B, Hkv, N) global slot
        bs[r, h, col] = torch.where(miss, dst, slot.long()).to(torch.int32).masked_fill(~valid, -1)
        sb[r, h, vcol] = torch.where(miss, blocks, -1)
        lu[r, h, vcol] = torch.where(miss, stamp_t, PINNED)

        dst = torch.where(hit, slot.long(), dst)
        if layer is None:
            flags = torch.stack([valid, hit, miss, overflow]).view(4, L, -1)
            self.counters[:L] += flags.sum(-1).t()
            return blocks.view(L, B, H, N), miss.view(L, B, H, N), dst.view(L, B, H, N)
        self.counters[layer] += torch.stack([valid.sum(), hit.sum(), miss.sum(), overflow.sum()])
        return blocks, miss, dst

    def unpin(self, layer: int, rows: Tensor, blocks: Tensor) -> None:
        """Make pinned `blocks` (B, Hkv, N) evictable again (stamped with this step), e.g. a block that
        left the local window."""
        S, W = self.hot_blocks, self.max_blocks_per_seq
        r, h = rows.long().view(-1, 1, 1), self._heads
        col = torch.where(blocks >= 0, blocks, W).long()
        slot = self.block_slot[layer][r, h, col]
        local = torch.where(slot >= 0, slot.long() - self._slot_base[rows.long()].unsqueeze(-1), S)
        lu = self.last_used[layer]
        lu[r, h, local] = torch.where(slot >= 0, self.demand_stamp(), PINNED)

    def write_through(self, layer: int, rows: Tensor, positions: Tensor, key: Tensor, value: Tensor) -> None:
        """Keep resident slots coherent with new tokens: token n of cache row `rows[n]` at logical
        `positions[n]` lands in the hot slot of its block for every kv head where that block is
        resident (a tail block copied in earlier would otherwise miss the tokens written since).

        rows, positions: (N,) int64; key, value: (N, Hkv, D). The masked write has a data-dependent
        shape: fine on CPU (the only caller today); a CUDA-graph version would write masked entries
        to a scratch slot instead."""
        W = self.max_blocks_per_seq
        blocks = (positions // self.block_size).clamp(max=W).view(-1, 1)  # (N, 1)
        slot = self.block_slot[layer][rows.long().view(-1, 1), self._heads.view(1, -1), blocks]  # (N, Hkv)
        resident = slot >= 0
        if not bool(resident.any()):  # CPU path: a host branch is free here
            return
        offs = (positions % self.block_size).view(-1, 1).expand_as(slot)
        hot_k, hot_v = self.layer_cache(layer)  # (R * Hkv * S, bs, 1, D)
        hot_k[slot[resident].long(), offs[resident], 0] = key[resident].to(hot_k.dtype)
        hot_v[slot[resident].long(), offs[resident], 0] = value[resident].to(hot_v.dtype)

    def block_table(self, layer: int, rows: Tensor) -> Tensor:
        """(B * Hkv, W) int32 global slots of each logical block (-1 = not resident): the block
        table of attention over `key[layer]` / `value[layer]` with folded heads."""
        W = self.max_blocks_per_seq
        return self.block_slot[layer][rows.long(), :, :W].reshape(-1, W)

    def layer_cache(self, layer: int) -> tuple[Tensor, Tensor]:
        """(key, value) of one layer, each (R * Hkv * S, block_size, 1, D)."""
        return self.key[layer], self.value[layer]

    def resident(self, layer: int, rows: Tensor) -> Tensor:
        """(B, Hkv, S) logical block in each slot (-1 free): for tests and debugging."""
        return self.slot_block[layer][rows.long(), :, : self.hot_blocks]
