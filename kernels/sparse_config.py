"""The knobs of AsyncTLS two-level sparse decode attention, resolved once and validated.

`SparseAttentionConfig` is frozen: the vLLM backend builds it once from `--additional-config`, the
reference (`sparse_decode_reference.py`) and the Triton kernels read it, and nothing on the decode
path re-reads or rewrites it. Every bad value raises `ValueError` naming the knob, the value received
and what is allowed, so a user sees which flag to change.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

SPARSE_MODES = ("asynctls", "block_only", "exact_topk", "dense")
INDEX_BITS = (4, 8, 16)
INDEX_CHANNEL_METRICS = ("mean_abs", "std")
INDEX_BASES = ("channels", "pca")
GROUP_SCORES = ("lse", "max")
MAX_SELECTION_BLOCK_SIZE = 1024


def _check_int(name: str, value: object, minimum: int, allowed: str) -> None:
    # bool is an int subclass: `token_budget=True` is a typo, not a budget of one.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """AsyncTLS selection knobs (defaults follow the paper's GQA settings).

    selection_block_size: tokens per block summary of the coarse level (power of two, 1..1024).
    num_blocks: selection blocks kept by the coarse level per kv head (>= 1).
    token_budget: tokens kept by the fine level per kv head, on top of sinks and the local window.
    sink_tokens: the first positions, always attended (>= 0).
    local_tokens: the last positions (the local window), always attended (>= 0).
    index_channels: key channels kept by the token index (32 for GQA; 128 for MLA, see `for_mla`).
    index_bits: bits per channel in the token index: 4, 8, or 16 (16 = exact scores from full keys).
    mode: "asynctls" (two levels), "block_only" (Quest at the same token budget), "exact_topk"
        (the oracle: exact top-k over all positions) or "dense" (no sparsity).
    lagged_selection: the paper's pipelining: tokens are chosen inside the blocks selected at the
        previous decode step, so those blocks had a whole step to arrive from host memory, and the
        GPU operator (with a workspace) runs this step's block stage on a stream of its own, once the
        token scores are written, beside the token top-k and the attention.
    index_channel_metric: the key statistic `choose_index_channels` ranks channels by at calibration:
        "mean_abs" (mean |k|, default) or "std" (spread over the calibration tokens: what can move
        the ranking; best with calibration queries). Only the chosen channel ids change, so the
        reference and the Triton kernels score the same way whichever is used.
    group_score: how the q heads of a GQA group combine their scores into the one score per kv head
        that every selection ranks by (block bounds, token-index scores and the exact top-k oracle):
        "lse" (default): `logsumexp_h(scale * s_h) / scale` with the softmax scale, i.e. the log of
        the group's summed unnormalised attention weight, so a token counts by the attention mass it
        would get across the group; "max": the largest head's score (a token counts if any head of
        the group scores it high). Both keep the block bound an upper bound of every token's group
        score in the block (each is monotone in every head's score). Measured (benchmarks/RESULTS.md,
        `bench_sparse_decode.py --recall-only`): "lse" holds more attention mass on the benchmark's
        planted keys and on SmolLM2-135M's own keys, at no extra bytes.
    block_bound_weight: how the coarse level scores a block from its min/max summary, per q head:
        `q . mid + w * (bound - q . mid)` with `bound = q+ . max + q- . min` (Quest's upper bound of
        every `q . k` in the block) and `mid = (min + max) / 2`, w in [0, 1]. 1.0 (default) is the
        paper's bound; lower values pull the score toward the block's midpoint, which ranks blocks of
        many moderately matching keys above blocks with one extreme channel. Same bytes; the GPU
        scorer adds one tensor-core dot for w < 1. Measured on SmolLM2-135M's own keys at 64K's
        selection shares (benchmarks/RESULTS.md): w = 0.5 holds 0.897 instead of 0.886 of exact top-k's
        attention mass with blocks of 64, 0.945 instead of 0.938 with blocks of 16.
    index_basis: the coordinates the index (block summaries and token codes) keeps the keys in.
        "channels" (default): the keys' own channels; the token index keeps `index_channels` of them.
        "pca": an orthonormal basis of each kv head's keys, ordered by second moment, calibrated from
        the keys a layer first writes (`choose_index_basis`, online, no file); the summaries bound the
        rotated keys, the token index keeps the `index_channels` leading directions, and the query is
        rotated the same way for the two selections (q . k is unchanged; attention reads the cache as
        it is). Measured (benchmarks/RESULTS.md, reference): share of exact top-k's attention mass on
        SmolLM2-135M's own keys at 64K's selection shares 0.893 -> 0.907 (blocks of 64), 0.944 -> 0.950
        (blocks of 16); on the benchmark's planted keys at 16K 0.895 -> 0.946 (budget 2048).
    """

    selection_block_size: int = 64
    num_blocks: int = 128
    token_budget: int = 2048
    sink_tokens: int = 64
    local_tokens: int = 64
    index_channels: int = 32
    index_bits: int = 4
    mode: str = "asynctls"
    lagged_selection: bool = False
    index_channel_metric: str = "mean_abs"
    group_score: str = "lse"
    block_bound_weight: float = 1.0
    index_basis: str = "channels"

    def __post_init__(self) -> None:
        s = self.selection_block_size
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s > MAX_SELECTION_BLOCK_SIZE or s & (s - 1):
            raise ValueError(
                f"selection_block_size must be a power of two in [1, {MAX_SELECTION_BLOCK_SIZE}]; got {s!r}"
            )
        _check_int("num_blocks", self.num_blocks, 1, "an int >= 1")
        _check_int("token_budget", self.token_budget, 1, "an int >= 1")
        _check_int("sink_tokens", self.sink_tokens, 0, "an int >= 0")
        _check_int("local_tokens", self.local_tokens, 0, "an int >= 0")
        _check_int("index_channels", self.index_channels, 1, "an int >= 1")
        bits = self.index_bits
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in INDEX_BITS:
            raise ValueError(f"index_bits must be one of {INDEX_BITS}; got {self.index_bits!r}")
        if self.index_bits == 4 and self.index_channels % 2:
            raise ValueError(
                f"index_channels must be even with index_bits=4 (two channels per byte); "
                f"got index_channels={self.index_channels}"
            )
        if self.mode not in SPARSE_MODES:
            raise ValueError(f"mode must be one of {SPARSE_MODES}; got {self.mode!r}")
        if self.index_channel_metric not in INDEX_CHANNEL_METRICS:
            raise ValueError(
                f"index_channel_metric must be one of {INDEX_CHANNEL_METRICS}; got {self.index_channel_metric!r}"
            )
        if self.index_basis not in INDEX_BASES:
            raise ValueError(f"index_basis must be one of {INDEX_BASES}; got {self.index_basis!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}; got {self.group_score!r}")
        w = self.block_bound_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise ValueError(f"block_bound_weight must be a number in [0, 1] (1 = the Quest bound); got {w!r}")
        if not isinstance(self.lagged_selection, bool):
            raise ValueError(f"lagged_selection must be a bool; got {self.lagged_selection!r}")
        if self.num_blocks * self.selection_block_size < self.token_budget:
            raise ValueError(
                f"token_budget must be <= num_blocks * selection_block_size (the candidates the coarse "
                f"level keeps); got token_budget={self.token_budget}, num_blocks={self.num_blocks}, "
                f"selection_block_size={self.selection_block_size} "
                f"({self.num_blocks * self.selection_block_size} candidates): raise num_blocks or lower "
                f"token_budget"
            )

    @classmethod
    def for_mla(cls, **overrides) -> "SparseAttentionConfig":
        """The MLA defaults (128 index channels over the latent + rope key), with overrides."""
        return cls(**{"index_channels": 128, **overrides})

    def with_(self, **changes) -> "SparseAttentionConfig":
        """A validated copy with some knobs changed."""
        return replace(self, **changes)

    def validate_for_cache(self, cache_block_size: int, head_dim: int) -> None:
        """Check the knobs against a KV cache: selection blocks must tile cache blocks exactly (so a
        block summary lives with its physical cache block) and the index cannot keep more channels
        than the key has."""
        if cache_block_size % self.selection_block_size != 0:
            raise ValueError(
                f"selection_block_size={self.selection_block_size} must divide the KV cache block size; "
                f"got cache_block_size={cache_block_size}: use --block-size with a multiple of "
                f"{self.selection_block_size}, or lower selection_block_size"
            )
        if self.index_channels > head_dim:
            raise ValueError(
                f"index_channels must be <= the key head dim {head_dim}; got index_channels={self.index_channels}"
            )

    @property
    def attended_tokens(self) -> int:
        """Size of the positions output per kv head: sinks, the local window and the token budget."""
        return self.sink_tokens + self.local_tokens + self.token_budget
