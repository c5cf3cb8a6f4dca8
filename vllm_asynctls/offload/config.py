"""Offload knobs, resolved once and validated (the plugin's `additional_config["asynctls"]` route).

    --additional-config '{"asynctls": {"offload": true, "offload_hot_blocks": 48}}'

`AsyncTLSConfig` (vllm_asynctls/config.py) carries the same fields and builds an `OffloadConfig` to
validate them (`AsyncTLSConfig.offload_config()`); `from_knobs` serves callers without vLLM (the
benchmark). `hot_cache_blocks_needed` is the one formula for "the blocks one decode step reads".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["OffloadConfig", "OFFLOAD_KNOBS", "hot_cache_blocks_needed"]

OFFLOAD_KNOBS = ("offload", "offload_hot_blocks", "offload_prefetch_depth")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hot_cache_blocks_needed(token_budget: int, num_blocks: int, selection_block_size: int, sink_tokens: int,
                            local_tokens: int, block_size: int) -> tuple[int, int]:
    """Distinct KV cache blocks one decode step can read per kv head: (selected, sink + local).

    Selected tokens lie in at most `num_blocks` selection blocks, each spanning
    `max(1, selection_block_size // block_size)` cache blocks, and in at most `token_budget` blocks
    (one token each); the sinks take `ceil(sink / block_size)` blocks and the local window
    `ceil(local / block_size) + 1` (it straddles a block boundary)."""
    selected = min(token_budget, num_blocks * max(1, selection_block_size // block_size))
    pinned = _cdiv(sink_tokens, block_size) + (_cdiv(local_tokens, block_size) + 1 if local_tokens else 0)
    return selected, pinned


@dataclass(frozen=True)
class OffloadConfig:
    """offload: keep long requests' K/V in host memory, a hot cache on the device (true / false).
    offload_hot_blocks: device slots per request and kv head, in KV cache blocks (>= 1); must cover
        the blocks one step reads (`hot_cache_blocks_needed`), checked by `check_against`.
    offload_prefetch_depth: layers prefetched ahead of the computing layer (>= 1).
    """

    offload: bool = False
    offload_hot_blocks: int = 64
    offload_prefetch_depth: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.offload, bool):
            raise ValueError(f"asynctls knob offload must be true or false; got {self.offload!r}")
        for name in ("offload_hot_blocks", "offload_prefetch_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"asynctls knob {name} must be an int >= 1; got {v!r}")

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, Any] | None) -> "OffloadConfig":
        return cls(**{k: v for k, v in (knobs or {}).items() if k in OFFLOAD_KNOBS})

    def check_against(self, token_budget: int, num_blocks: int, selection_block_size: int, sink_tokens: int,
                      local_tokens: int, block_size: int) -> int:
        """ValueError naming the knob when the hot cache cannot hold one step's blocks; returns the
        blocks one step reads per kv head (selected + sink/local)."""
        selected, pinned = hot_cache_blocks_needed(token_budget, num_blocks, selection_block_size, sink_tokens,
                                                   local_tokens, block_size)
        need = selected + pinned
        if self.offload and self.offload_hot_blocks < need:
            raise ValueError(
                f"asynctls knob offload_hot_blocks must be >= {need} (up to {selected} selected blocks + "
                f"{pinned} sink/local blocks per kv head with token_budget={token_budget}, "
                f"num_blocks={num_blocks}, KV cache block size {block_size}); got {self.offload_hot_blocks}. "
                f"Raise offload_hot_blocks or lower token_budget / num_blocks"
            )
        return need
