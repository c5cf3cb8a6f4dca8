"""AsyncTLS knobs, read once from vLLM's plugin configuration route and validated there.

    vllm serve MODEL --attention-backend asynctls \
        --additional-config '{"asynctls": {"token_budget": 1024, "dense_threshold": 8192}}'
    LLM(MODEL, attention_backend="asynctls", additional_config={"asynctls": {...}})

`AsyncTLSConfig` is frozen and resolved once per process (metadata builder and every layer's impl
read the same object); nothing on the decode path re-reads `additional_config`. The selection knobs
are validated by `asynctls_tip_kernels.sparse_config.SparseAttentionConfig` (one source of truth
for their ranges); this module adds the plugin-only knob `dense_threshold` and the auto value of
`index_channels`, and checks the knobs against the model (head dim, cache block size) at start-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

ADDITIONAL_CONFIG_KEY = "asynctls"

# Paper defaults (secondary accounts): 32 index channels for GQA models, 128 for MLA.
GQA_INDEX_CHANNELS = 32
MLA_INDEX_CHANNELS = 128
# Selection modes that choose positions from the index alone ("exact_topk" and "dense" read every key).
OFFLOAD_MODES = ("asynctls", "block_only")


@dataclass(frozen=True)
class AsyncTLSConfig:
    """The knobs of `--additional-config '{"asynctls": {...}}'`.

    token_budget: tokens each kv head attends to beyond the sinks and the local window (>= 1).
    num_blocks: selection blocks the coarse level keeps per kv head (>= 1;
        num_blocks * selection_block_size >= token_budget).
    selection_block_size: tokens summarised by one block min/max (power of two, 1..1024); must divide
        vLLM's KV cache block size (16 for MLA on CPU, 128 for CPU_ATTN, 16 on most GPU backends).
        16 with 512 blocks keeps the paper's 8,192 candidate tokens.
    sink_tokens: first positions always attended (>= 0).
    local_tokens: last positions always attended (>= 0).
    index_channels: key channels kept by the token index; None picks 32 (GQA) or 128 (MLA), capped at
        the key head dim; an explicit value must be in [1, key head dim] (even with 4 bits).
    index_bits: 4, 8 or 16 (16 scores tokens with their full keys).
    index_channel_metric: how the index channels are ranked at calibration: "mean_abs" (largest mean
        |k|, the default: best measured on SmolLM2's keys) or "std" (largest spread; skips channels
        that only add a constant offset to every score).
    group_score: how a GQA group's q heads combine into the one score per kv head that selection ranks
        by: "lse" (log of the group's summed attention weight, the default) or "max" (the largest head).
    block_bound_weight: the block score `q . mid + w (bound - q . mid)` from the min/max summary, w in
        [0, 1]: 1.0 (default) is Quest's upper bound, as in the paper; 0.5 held more attention mass on
        SmolLM2's keys (`SparseAttentionConfig.block_bound_weight`).
    index_basis: the coordinates of the index (block summaries and token codes): "channels" (the keys'
        own, the default) or "pca" (each kv head's principal directions, calibrated online from the
        first prefill's keys; `SparseAttentionConfig.index_basis`: more of exact top-k's attention mass
        on SmolLM2's keys, one small matmul per layer and decode step). Not with index_calibration_file.
    dense_threshold: decode tokens whose context is at most this many tokens use the platform's dense
        attention (so short-context serving costs nothing extra); 0 sends every decode token to the
        sparse path (>= 0).
    mode: "asynctls" (two levels), "block_only" (Quest), "exact_topk" (oracle) or "dense".
    offload: keep every request's K/V in a host pool and serve long decode tokens through a per-request
        hot cache of `offload_hot_blocks` blocks (true / false; see `vllm_asynctls.offload.connector`).
        Needs mode "asynctls" or "block_only" with index_bits 4 or 8 (selection must not read full keys).
    offload_hot_blocks: hot-cache slots per request and kv head, in KV cache blocks (>= 1); must cover
        the blocks one decode step reads (checked against the cache block size at start-up).
    offload_prefetch_depth: layers prefetched ahead of the computing one (>= 1).
    lagged_selection: the paper's pipelining (true / false, default false): each decode step selects
        tokens inside the blocks the request's previous step chose, so on the GPU this step's block
        stage runs beside the token stage instead of before it. The choices are kept per layer between
        steps (`vllm_asynctls.lagged_state`, about 4 * num_blocks / selection_block_size bytes per
        token and kv head); a request's first sparse step selects inside its most recent blocks.
        Mode "asynctls" only, with local_tokens >= 1, without offload.
    index_calibration_file: path of a JSON file of per-layer index channels made by
        `python -m vllm_asynctls.calibration MODEL --out FILE` (`vllm_asynctls.calibration`); null (the
        default) chooses them online from the first prefill's keys. Checked against the model at
        start-up; GQA / MHA models, index_bits 4 or 8.
    """

    token_budget: int = 2048
    num_blocks: int = 512
    selection_block_size: int = 16
    sink_tokens: int = 64
    local_tokens: int = 64
    index_channels: int | None = None
    index_bits: int = 4
    index_channel_metric: str = "mean_abs"
    group_score: str = "lse"
    block_bound_weight: float = 1.0
    index_basis: str = "channels"
    dense_threshold: int = 4096
    mode: str = "asynctls"
    offload: bool = False
    offload_hot_blocks: int = 64
    offload_prefetch_depth: int = 1
    lagged_selection: bool = False
    index_calibration_file: str | None = None

    def __post_init__(self) -> None:
        t = self.dense_threshold
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(
                f"asynctls knob dense_threshold must be an int >= 0 (0 = every decode token sparse); got {t!r}"
            )
        c = self.index_channels
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(
                f"asynctls knob index_channels must be null (auto: {GQA_INDEX_CHANNELS} for GQA, "
                f"{MLA_INDEX_CHANNELS} for MLA) or an int >= 1; got {c!r}"
            )
        # The selection knobs' ranges live in SparseAttentionConfig; build one to validate them.
        self.sparse_config(head_dim=None, is_mla=False)
        # The offload knobs' ranges live in OffloadConfig.
        self.offload_config()
        if self.offload and (self.mode not in OFFLOAD_MODES or self.index_bits == 16):
            raise ValueError(
                f"asynctls knob offload=true needs mode in {list(OFFLOAD_MODES)} and index_bits in [4, 8] "
                f"(the selection must run on the index, not on keys that live in host memory); got "
                f"mode={self.mode!r}, index_bits={self.index_bits!r}"
            )
        f = self.index_calibration_file
        if f is not None:
            if not isinstance(f, str) or not f:
                raise ValueError(f"asynctls knob index_calibration_file must be null or a file path; got {f!r}")
            if self.index_basis != "channels":
                raise ValueError(f"asynctls knob index_calibration_file holds index channels, so it needs "
                                 f"index_basis 'channels'; got index_basis={self.index_basis!r} with {f!r}")
            if self.index_bits == 16:
                raise ValueError("asynctls knob index_calibration_file needs index_bits 4 or 8 (index_bits=16 scores "
                                 f"with the full keys and has no index channels); got index_bits=16 with {f!r}")
            self.index_calibration()
        if self.lagged_selection and (self.mode != "asynctls" or self.offload or self.local_tokens < 1):
            raise ValueError(
                f"asynctls knob lagged_selection=true needs mode 'asynctls', offload=false and local_tokens >= 1 "
                f"(the other modes have no block stage to lag; offload selects on its own path; without a local "
                f"window the newest token's block cannot have been chosen a step early); got mode={self.mode!r}, "
                f"offload={self.offload!r}, local_tokens={self.local_tokens!r}"
            )

    # ------------------------------------------------------------------------------------------
    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, knobs: Mapping[str, Any] | None) -> "AsyncTLSConfig":
        """Build from the `"asynctls"` entry of `additional_config`; unknown knobs are errors."""
        if knobs is None:
            return cls()
        if not isinstance(knobs, Mapping):
            raise ValueError(
                f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] must be a JSON object of knobs "
                f"{list(cls.knob_names())}; got {type(knobs).__name__}: {knobs!r}"
            )
        unknown = sorted(set(knobs) - set(cls.knob_names()))
        if unknown:
            raise ValueError(
                f"unknown asynctls knob(s) {unknown}; allowed knobs: {list(cls.knob_names())}"
            )
        return cls(**dict(knobs))

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "AsyncTLSConfig":
        return cls.from_dict((additional_config or {}).get(ADDITIONAL_CONFIG_KEY))

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "AsyncTLSConfig":
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------------------------------
    def resolved_index_channels(self, head_dim: int | None, is_mla: bool) -> int:
        if self.index_channels is not None:
            return self.index_channels
        default = MLA_INDEX_CHANNELS if is_mla else GQA_INDEX_CHANNELS
        if head_dim is None:
            return default
        channels = min(default, head_dim)
        return channels - (channels % 2) if self.index_bits == 4 and channels > 1 else channels

    def index_calibration(self):
        """The `index_calibration_file` as a validated `vllm_asynctls.calibration.IndexCalibration`
        (read once per process), or None."""
        if self.index_calibration_file is None:
            return None
        from vllm_asynctls.calibration import load_calibration

        try:
            return load_calibration(self.index_calibration_file)
        except ValueError as e:
            raise ValueError(f"asynctls knob index_calibration_file: {e}") from None

    def check_index_calibration(self, vllm_config: Any, head_dim: int, index_channels: int, is_mla: bool):
        """The calibration (or None) after checking it fits the attention layers of `vllm_config`'s model
        (its layer count and total kv heads, keys of dim `head_dim`); ValueError naming the knob otherwise."""
        cal = self.index_calibration()
        if cal is None:
            return None
        if is_mla:
            raise ValueError(
                "asynctls knob index_calibration_file is implemented for GQA / MHA models (the calibration "
                "command captures q_proj / k_proj keys); MLA layers choose their channels online: drop the knob"
            )
        model_config = vllm_config.model_config
        num_layers = model_config.hf_text_config.num_hidden_layers
        try:
            cal.check_model(num_layers, model_config.get_total_num_kv_heads(), head_dim, index_channels)
        except ValueError as e:
            raise ValueError(f"asynctls knob index_calibration_file {self.index_calibration_file!r}: {e}") from None
        return cal

    def offload_config(self):
        """The offload knobs as `vllm_asynctls.offload.OffloadConfig` (validated there)."""
        from vllm_asynctls.offload.config import OffloadConfig

        return OffloadConfig(
            offload=self.offload,
            offload_hot_blocks=self.offload_hot_blocks,
            offload_prefetch_depth=self.offload_prefetch_depth,
        )

    def sparse_config(self, head_dim: int | None, is_mla: bool) -> SparseAttentionConfig:
        """The kernels' config for a layer with key head dim `head_dim` (the latent + rope width for
        MLA). Raises ValueError naming the knob when a knob is out of range."""
        try:
            cfg = SparseAttentionConfig(
                selection_block_size=self.selection_block_size,
                num_blocks=self.num_blocks,
                token_budget=self.token_budget,
                sink_tokens=self.sink_tokens,
                local_tokens=self.local_tokens,
                index_channels=self.resolved_index_channels(head_dim, is_mla),
                index_bits=self.index_bits,
                index_channel_metric=self.index_channel_metric,
                group_score=self.group_score,
                block_bound_weight=self.block_bound_weight,
                index_basis=self.index_basis,
                mode=self.mode,
                lagged_selection=self.lagged_selection,
            )
        except ValueError as e:
            raise ValueError(f"asynctls knob {e}") from None
        if head_dim is not None and cfg.index_channels > head_dim:
            raise ValueError(
                f"asynctls knob index_channels must be in [1, {head_dim}] (the key head dim of this "
                f"model); got {cfg.index_channels}"
            )
        return cfg

    def index_fraction(self, head_dim: int, is_mla: bool, dtype_bytes: int) -> float:
        """Share of the KV-cache memory the per-layer index takes when both live in one budget.

        Per token and kv head: K/V take `2 * D * b` bytes (MLA: one latent row, `D * b`); the index
        takes the block min/max (int8 codes and one float32 scale per selection block:
        `(2 * D + 4) / selection_block_size`) plus the low-bit codes and one float32 scale (nothing
        for `index_bits == 16`), plus with `lagged_selection` the previous step's block ids
        (`4 * num_blocks / selection_block_size`).
        """
        cfg = self.sparse_config(head_dim=head_dim, is_mla=is_mla)
        kv = (1 if is_mla else 2) * head_dim * dtype_bytes
        index = (2 * head_dim + 4) / cfg.selection_block_size
        if cfg.index_bits != 16:
            index += cfg.index_channels * cfg.index_bits / 8 + 4
        if cfg.lagged_selection:
            index += 4 * cfg.num_blocks / cfg.selection_block_size  # the previous step's block ids
        return index / (kv + index)

    def check_cache_block_size(self, cache_block_size: int) -> None:
        """Selection blocks must tile vLLM's cache blocks, so summaries live with physical blocks
        (and stay valid under prefix caching)."""
        if cache_block_size % self.selection_block_size:
            raise ValueError(
                f"asynctls knob selection_block_size must divide the KV cache block size "
                f"{cache_block_size}; got {self.selection_block_size}. Lower selection_block_size or "
                f"pass --block-size with a multiple of it"
            )
