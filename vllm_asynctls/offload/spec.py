"""Scheduler side of the offload: a KV cache spec and its manager, registered with vLLM's
`KVCacheSpecRegistry` (the extension point vLLM 0.32 gives out-of-tree specs).

What the scheduler counts against the device KV cache decides how many long requests run at once.
With offload on, the attention layers of the asynctls backend report `AsyncTLSOffloadSpec` (a
`FullAttentionSpec` with three more fields, returned by `AsyncTLSAttentionBackend.customize_spec`),
and vLLM builds an `AsyncTLSOffloadManager` for their group:

- A request prefills densely (chunked prefill needs every earlier chunk's K/V in the paged cache),
  so while it prefills it holds its whole prompt, as under full attention.
- Once its committed context passes `offload_threshold` (the plugin's `dense_threshold`: from there
  on every decode token of the request takes the sparse path, which reads through the hot cache) and
  its prompt is done, the manager frees every block but the first (the request's key on the worker,
  see connector.py) and those at or after the last committed token (the block being written, and
  anything in flight). This is vLLM's own recycling move (`_remove_blocks_in_range`, as R-SWA frees
  its decode gap, driven by `remove_skipped_blocks(..., num_prompt_tokens)`); the freed blocks'
  K/V already sit in the host pool (written through at every KV write).
- The hot caches live in the same device pool: at start-up the manager takes
  `hot_rows * hot_blocks` blocks out of the block pool for good (one row of `hot_blocks` blocks per
  possible running request; a row holds `hot_blocks` slots for each kv head, since one vLLM block
  holds all kv heads of `block_size` tokens). The worker binds `HotBlockCache`'s storage to exactly
  those blocks of each layer's KV tensor, so the device footprint the scheduler counts is the real one.
- Prefix-cache hits are not served for this group: a hit would give a request K/V it never
  computed, hence never wrote to its host rows. `find_longest_cache_hit` reports no hit (blocks are
  still hashed; nothing is read back).

Admission then needs, per decoding long request, two blocks (first + tail) instead of its context;
the hot-cache row it uses was paid for at start-up.

Preemption: a preempted request is recomputed as a prefill of prompt + generated tokens, longer
than the `num_prompt_tokens` that `remove_skipped_blocks` is given. The connector, which sees the
request when the scheduler re-admits it (`update_state_after_alloc`), tells the manager
(`hold_until`) to keep every block until that recompute is done. The backend also checks that no
prefill chunk reads a freed block (it raises rather than attend over the null block).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

__all__ = ["AsyncTLSOffloadSpec", "AsyncTLSOffloadManager", "register_offload_spec"]


@dataclass(frozen=True, kw_only=True)
class AsyncTLSOffloadSpec(FullAttentionSpec):
    """offload_threshold: context above which a request decodes through the hot cache (tokens);
    hot_rows: hot-cache rows (max_num_seqs); hot_blocks: KV cache blocks per row;
    max_model_len: the engine's, to check at start-up that one full-length prefill still fits."""

    offload_threshold: int
    hot_rows: int
    hot_blocks: int
    max_model_len: int

    @property
    def hot_cache_blocks(self) -> int:
        return self.hot_rows * self.hot_blocks

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, **offload_fields) -> "AsyncTLSOffloadSpec":
        base = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(**base, **offload_fields)

    @classmethod
    def merge(cls, specs: list["AsyncTLSOffloadSpec"]) -> "AsyncTLSOffloadSpec":
        extra = {(s.offload_threshold, s.hot_rows, s.hot_blocks, s.max_model_len) for s in specs}
        if len(extra) != 1 or not all(isinstance(s, AsyncTLSOffloadSpec) for s in specs):
            raise ValueError(f"asynctls offload: all layers of a KV cache group must share one offload setting; "
                             f"got {sorted(extra)}")
        (threshold, rows, blocks, max_len), = extra
        return cls.from_spec(FullAttentionSpec.merge(specs), offload_threshold=threshold, hot_rows=rows,
                             hot_blocks=blocks, max_model_len=max_len)


class AsyncTLSOffloadManager(FullAttentionManager):
    """Full attention while prefilling; first + tail blocks once decoding through the hot cache."""

    def __init__(self, kv_cache_spec: AsyncTLSOffloadSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        spec = kv_cache_spec
        n = spec.hot_cache_blocks
        free = self.block_pool.get_num_free_blocks()
        one_request = cdiv(spec.max_model_len, self.block_size)
        if free < n + one_request:
            raise ValueError(
                f"asynctls offload: the device KV cache has {free} free blocks of {self.block_size} tokens; the hot "
                f"caches need {n} (max_num_seqs={spec.hot_rows} x offload_hot_blocks={spec.hot_blocks}) and one "
                f"prefill of max_model_len={spec.max_model_len} needs {one_request} more, {n + one_request} in all. "
                f"Lower max_num_seqs or offload_hot_blocks, or give the KV cache more memory"
            )
        blocks = self.block_pool.get_new_blocks(n)
        ids = [b.block_id for b in blocks]
        if ids != list(range(ids[0], ids[0] + n)):
            # The worker binds the hot caches to one contiguous range of every layer's KV tensor.
            self.block_pool.free_blocks(blocks)
            raise RuntimeError(f"asynctls offload: the hot-cache blocks must be contiguous; the block pool gave "
                               f"{ids[:8]}... (was the pool used before the offload manager was built?)")
        self.hot_cache_blocks = blocks
        self.hot_cache_first_block = ids[0]
        self._prefill_end: dict[str, int] = {}  # request -> tokens a re-admitted request recomputes

    def hold_until(self, request_id: str, num_tokens: int) -> None:
        """Keep all of the request's blocks until `num_tokens` are computed (a preempted request's
        recompute covers its generated tokens too, past `num_prompt_tokens`)."""
        self._prefill_end[request_id] = num_tokens

    def pop_blocks_for_free(self, request_id: str):
        self._prefill_end.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        spec: AsyncTLSOffloadSpec = self.kv_cache_spec
        if num_prompt_tokens is None:
            return
        if processed_computed_tokens < max(num_prompt_tokens, self._prefill_end.get(request_id, 0)):
            return  # still prefilling: the dense prefill reads every earlier chunk from the paged cache
        if processed_computed_tokens <= spec.offload_threshold:
            return  # still decoding densely (CPU_ATTN over the paged cache)
        # Keep block 0 (the worker keys the request's rows on it) and the blocks from the last
        # committed token on (the one being written, and anything in flight).
        self._remove_blocks_in_range(request_id, 1, processed_computed_tokens // self.block_size)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        # No hits: a hit's K/V was never written to this request's host rows (module doc).
        return tuple([] for _ in kv_cache_group_ids), 0


def register_offload_spec() -> None:
    """Register `AsyncTLSOffloadSpec` -> `AsyncTLSOffloadManager` (idempotent; every process)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # The registry fills itself with vLLM's built-in specs only while it is empty: fill it first,
    # or registering ours would leave the built-ins out.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(AsyncTLSOffloadSpec, AsyncTLSOffloadManager,
                                 uniform_type_base_spec=FullAttentionSpec)


register_offload_spec()
