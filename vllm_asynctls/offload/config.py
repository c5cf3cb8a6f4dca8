"""Offload knobs, resolved once and validated (the plugin's `additional_config["asynctls"]` route).

    --additional-config '{"asynctls": {"offload": true, "offload_hot_blocks": 48}}'

`OffloadConfig.from_knobs` takes the `"asynctls"` dict and reads only the `offload*` knobs;
`AsyncTLSConfig` (vllm_asynctls/config.py) should grow the same two fields and hand them here (not
done yet: that file is owned elsewhere; until then `from_knobs` is the parser and validator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["OffloadConfig", "OFFLOAD_KNOBS"]

OFFLOAD_KNOBS = ("offload", "offload_hot_blocks", "offload_prefetch_depth")


@dataclass(frozen=True)
class OffloadConfig:
    """offload: keep long requests' K/V in pinned host memory, a hot cache on the GPU.
    offload_hot_blocks: GPU slots per request and kv head, in KV cache blocks (>= 1); must cover
        the blocks one step reads (token budget / block size, sinks, local window) plus slack.
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

    def check_against(self, token_budget: int, sink_tokens: int, local_tokens: int, block_size: int,
                      selection_block_size: int) -> None:
        """The hot cache must hold one step's blocks: ValueError naming the knob otherwise.

        Worst case per kv head: every selected token in its own block (bounded by token_budget and by
        the selection granularity), plus the sink blocks and the local window's blocks (+1: the window
        straddles a block boundary)."""
        selected = token_budget if selection_block_size < block_size else -(-token_budget // block_size)
        pinned = -(-sink_tokens // block_size) + -(-local_tokens // block_size) + 1
        need = selected + pinned
        if self.offload and self.offload_hot_blocks < need:
            raise ValueError(
                f"asynctls knob offload_hot_blocks must be >= {need} (selected blocks {selected} + sink/local "
                f"blocks {pinned} with token_budget={token_budget}, block size {block_size}); got "
                f"{self.offload_hot_blocks}"
            )
