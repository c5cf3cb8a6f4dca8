"""Plain-PyTorch reference of AsyncTLS two-level sparse decode attention (the truth for kernels/README.md).

Design note
-----------
One decode token per sequence attends to a fixed number of positions per kv head:
sinks `[0, sink_tokens)`, the local window `[L - local_tokens, L)` and `token_budget` positions chosen
in two levels from the rest (the *candidates* `[sink_tokens, L - local_tokens)`):

1. `score_blocks` / `select_blocks`: every selection block of `selection_block_size` tokens has an
   elementwise min / max summary of its keys (`write_index` keeps it up to date), stored as int8 codes
   with one float32 scale per (selection block, kv head), min rounded down and max rounded up. Its
   Quest bound `sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min` is an upper bound of `q . k`
   for every key in the block: the dequantised summary bounds every key exactly, per channel (see
   `quantize_summary`), so only the dot products' float32 rounding remains. The top `num_blocks`
   blocks that hold at least one candidate survive.
2. `score_tokens` / `select_tokens`: inside the kept blocks, each candidate is scored from a compact
   index (`index_channels` key channels, quantised to `index_bits`; exact `q . k` with 16 bits) and
   the top `token_budget` survive.
3. `sparse_attention`: exact attention over the attended positions, float32, the dense softmax's
   numerics (so with a budget covering the whole context the output equals `dense_decode_attention`).

GQA: the `Hq // Hkv` query heads of a group share one selection per kv head (one set of K/V reads);
every score (block bound, token score, and the exact oracle's score) combines the group's heads by
`config.group_score` (`_combine_group`): "lse" (default), `logsumexp_h(scale * s_h) / scale` with the
softmax scale, the log of the group's summed unnormalised attention weight, so a token ranks by the
mass it would draw across the group; or "max", a token matters if any head of the group scores it
high. Both are monotone in every head's score, so a block's combined bound still bounds the combined
score of every token in it. q head `h` uses kv head `h // (Hq // Hkv)`. The selection functions take
`softmax_scale` (the attention's scale; default `1 / sqrt(Dk)`, which is what `sparse_decode` passes
for standard attention), used only as the "lse" temperature.

MLA is the same code with `Hkv = 1`: the key is the latent + rope vector (`kv_lora_rank + rope_dim`),
the query is the absorbed query of the same width, and `value_cache` is a view of the first
`kv_lora_rank` channels of `key_cache`. The index channels are chosen over the whole key (latent and
rope alike), which keeps `q . k` the quantity being approximated.

All math is float32 whatever the cache dtype; every stage returns fixed-size tensors (`-1` pads
positions and block ids, `-inf` pads scores), so the GPU kernels can mirror it without host syncs.
The only data-dependent shapes are in `write_index` (dropping padded slots), which runs on the CPU
path only; the Triton writer masks instead.

Lagged selection (the paper's pipelining): with `config.lagged_selection`, step t selects tokens inside
the blocks step t-1 chose (`previous_block_ids`) and returns its own block choice for step t+1, ranked
over step t+1's candidates (`lagged_block_config`: the local window one token shorter, so the block
of the token that leaves the window next step can be kept). With a budget covering the context the
lagged step is then still exact; otherwise it misses what only this step's query would have chosen,
the price of having the blocks one step early.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .sparse_config import INDEX_CHANNEL_METRICS, SparseAttentionConfig

__all__ = [
    "SparseIndex",
    "allocate_index",
    "choose_index_channels",
    "set_index_channels",
    "choose_index_basis",
    "set_index_basis",
    "calibrate_index",
    "rotate_query",
    "rotate_keys",
    "quantize_index",
    "dequantize_index",
    "quantize_summary",
    "dequantize_summary",
    "write_index",
    "score_blocks",
    "lagged_block_config",
    "lagged_slots",
    "recent_block_ids",
    "previous_block_ids",
    "record_block_ids",
    "select_blocks",
    "score_tokens",
    "select_tokens",
    "attended_positions",
    "sparse_attention",
    "dense_decode_attention",
    "block_only_positions",
    "exact_topk_positions",
    "sparse_decode",
    "attention_mass_recall",
    "mass_optimal_positions",
    "group_temperature",
]

NEG_INF = float("-inf")
SUMMARY_QMAX = 127  # block summary codes are int8 in [-127, 127]
# The summary codes' first guess, in code steps: floor(x / scale + TOL), ceil(x / scale - TOL). Without
# it a stored code c does not always requantise to c under an unchanged scale (float32 (c * s) / s may
# land a hair below c), and a plain floor would then drift one code per decode token. It leaves no
# slack: `quantize_summary` then moves a code one step outward wherever `code * scale` misses the value,
# so the stored summary bounds its keys exactly.
SUMMARY_TOL = 1e-3


# ----------------------------------------------------------------------------------------------
# Index state
# ----------------------------------------------------------------------------------------------


@dataclass
class SparseIndex:
    """Per-layer index state (layouts in kernels/README.md).

    block_min, block_max: (num_cache_blocks, cache_block_size // selection_block_size, Hkv, Dk) int8
        codes in [-127, 127] of the elementwise min / max of each selection block's keys, rounded
        outward (min down, max up); the summary is `code.float() * block_scale[..., None]` and bounds
        every key of its block exactly (`quantize_summary`).
    block_scale: (num_cache_blocks, cache_block_size // selection_block_size, Hkv) float32, one scale
        per (selection block, kv head): `max_d max(|min_d|, |max_d|) / 127`, one float32 step up where
        needed for `127 * scale` to reach it (0 for an all-zero summary, whose codes are then 0).
    channel_ids: (Hkv, index_channels) int64, the key channels the token index keeps.
    codes: (num_cache_blocks, cache_block_size, Hkv, index_channels * index_bits // 8) uint8, or None
        when index_bits == 16.
    scales: (num_cache_blocks, cache_block_size, Hkv) float32, or None when index_bits == 16.
    key_dtype: the key (cache) dtype: new keys are cast to it before they are summarised or quantised.
    basis: None (the keys' own channels) or (Hkv, Dk, Dk) float32 orthonormal rows (`index_basis="pca"`,
        `set_index_basis`): the summaries and codes then hold each key rotated, `basis[h] @ k` (cast
        to key_dtype), the selections score the query rotated the same way (`rotate_query`), and
        `channel_ids` are the leading rows.
    """

    block_min: Tensor
    block_max: Tensor
    block_scale: Tensor
    channel_ids: Tensor
    codes: Tensor | None
    scales: Tensor | None
    key_dtype: torch.dtype
    basis: Tensor | None = None

    @property
    def blocks_per_cache_block(self) -> int:
        return self.block_min.shape[1]


def allocate_index(
    num_cache_blocks: int,
    cache_block_size: int,
    num_kv_heads: int,
    head_dim: int,
    config: SparseAttentionConfig,
    dtype: torch.dtype,
    device: torch.device | str,
) -> SparseIndex:
    """Zeroed index state for one layer. `channel_ids` starts as the first `index_channels` channels;
    call `set_index_channels` (from `choose_index_channels` on calibration keys) before the first
    `write_index`, because codes are quantised on the channels current at write time.
    `dtype` is the key (cache) dtype (`SparseIndex.key_dtype`); summaries are int8 codes whatever it is."""
    config.validate_for_cache(cache_block_size, head_dim)
    per_block = cache_block_size // config.selection_block_size
    block_min = torch.zeros(num_cache_blocks, per_block, num_kv_heads, head_dim, dtype=torch.int8, device=device)
    block_max = torch.zeros_like(block_min)
    block_scale = torch.zeros(num_cache_blocks, per_block, num_kv_heads, dtype=torch.float32, device=device)
    channel_ids = (
        torch.arange(config.index_channels, dtype=torch.int64, device=device)
        .expand(num_kv_heads, config.index_channels)
        .contiguous()
    )  # (Hkv, C)
    if config.index_bits == 16:
        codes = scales = None
    else:
        nbytes = config.index_channels * config.index_bits // 8
        # Stored head-major, returned as views in the contract's (block, token, head, ...) shape: a
        # scorer reading one kv head's codes for consecutive tokens then reads one contiguous run
        # (cache_block_size * nbytes bytes) instead of nbytes at a stride of Hkv * nbytes. Every
        # consumer goes through strides, so the logical layout is unchanged.
        codes = torch.zeros(num_cache_blocks, num_kv_heads, cache_block_size, nbytes, dtype=torch.uint8,
                            device=device).permute(0, 2, 1, 3)  # (blocks, tokens, Hkv, nbytes) view
        scales = torch.zeros(num_cache_blocks, num_kv_heads, cache_block_size, dtype=torch.float32,
                             device=device).permute(0, 2, 1)  # (blocks, tokens, Hkv) view
    # index_basis="pca": the identity until `set_index_basis` calibrates it in place, so a CUDA graph
    # captured before calibration (vLLM captures at start-up) rotates with the calibrated basis.
    basis = (torch.eye(head_dim, dtype=torch.float32, device=device).expand(num_kv_heads, head_dim, head_dim)
             .contiguous() if config.index_basis == "pca" else None)
    return SparseIndex(block_min, block_max, block_scale, channel_ids, codes, scales, dtype, basis)


def choose_index_channels(
    keys: Tensor, num_channels: int, metric: str = "mean_abs", queries: Tensor | None = None
) -> Tensor:
    """The key channels the token index keeps (Double Sparsity's calibration), per kv head.

    keys: (N, Hkv, D) calibration keys (the prompt's, in the plugin). queries: optional (M, Hq, D)
    calibration queries (the prompt's, or the first decode steps'), Hq a multiple of Hkv (q head h
    belongs to kv head h // (Hq // Hkv)).
    metric (`SparseAttentionConfig.index_channel_metric`), the key statistic per channel:
    - "mean_abs" (default): mean |k|. Keeps large-magnitude channels, which in real models are
      also where the queries are large.
    - "std": the spread of the channel over the calibration tokens. The top-k only compares tokens
      with each other, so a channel whose key is a constant offset adds the same `q_c * mean_c` to
      every score and cannot change the ranking; what a channel adds to the ranking is
      `q_c * (k_c - mean_c)`, of spread `|q_c| * std_c`. Without queries this drops the q-magnitude
      information mean |k| carries.
    With `queries`, the statistic is multiplied by each channel's root mean square over the group's
    calibration queries, i.e. "std" ranks channels by the spread `|q_c| std_c` of their q.k term.
    Measured (recall relative to exact top-k, 4-bit index, 1/4 of the channels, group_score "max"):
      benchmark's planted-structure keys, 16K, budgets 2048/1024/512: mean_abs 0.88/0.86/0.85,
        std 0.92/0.93/0.93 (their heavy channels are pure constant offsets);
      SmolLM2-135M's own keys/queries, 4K, budgets 512/128: mean_abs 0.965/0.968, std 0.956/0.953,
        std with prefill queries 0.967/0.970, mean_abs with queries 0.967/0.971.
    So "std" with queries is the best on both; keys only, neither metric wins on both.
    Returns (Hkv, num_channels) int64, ascending per head. Only which channels are kept changes:
    scoring (reference and Triton) reads `channel_ids` as given.
    """
    if not 1 <= num_channels <= keys.shape[-1]:
        raise ValueError(f"num_channels must be in [1, {keys.shape[-1]}] (the key head dim); got {num_channels}")
    if metric not in INDEX_CHANNEL_METRICS:
        raise ValueError(f"metric must be one of {INDEX_CHANNEL_METRICS}; got {metric!r}")
    k = keys.float()  # (N, Hkv, D)
    if metric == "std":
        weight = k.std(dim=0, correction=0) if k.shape[0] > 1 else k.abs()[0]  # (Hkv, D); one key: |k|
    else:
        weight = k.abs().mean(dim=0)  # (Hkv, D)
    if queries is not None:
        num_kv_heads = keys.shape[1]
        if queries.dim() != 3 or queries.shape[-1] != keys.shape[-1] or queries.shape[1] % num_kv_heads:
            raise ValueError(
                f"queries must be (M, Hq, {keys.shape[-1]}) with Hq a multiple of Hkv={num_kv_heads}; "
                f"got {tuple(queries.shape)}"
            )
        q = queries.float().view(queries.shape[0], num_kv_heads, -1, keys.shape[-1])  # (M, Hkv, G, D)
        weight = weight * q.square().mean(dim=(0, 2)).sqrt()  # (Hkv, D)
    return weight.topk(num_channels, dim=-1).indices.sort(dim=-1).values.to(torch.int64)


def set_index_channels(index: SparseIndex, channel_ids: Tensor) -> None:
    """Install calibrated channels (Hkv, C) in place. Codes written before this are stale."""
    if index.basis is not None:
        raise ValueError("set_index_channels: this index holds a basis (index_basis='pca'), whose token index "
                         "keeps the leading directions; calibrate it with set_index_basis")
    if channel_ids.shape != index.channel_ids.shape:
        raise ValueError(f"channel_ids must have shape {tuple(index.channel_ids.shape)}; got {tuple(channel_ids.shape)}")
    index.channel_ids.copy_(channel_ids)


def choose_index_basis(keys: Tensor) -> Tensor:
    """The index's coordinates for `index_basis="pca"`, per kv head: the eigenvectors of the keys'
    uncentred second moment `k k^T / N`, ordered by decreasing eigenvalue, so the leading rows carry
    most of every `q . k` in the mean square (the top-k compares tokens under one query, and a
    direction along which the keys hardly move cannot change it). Loki (Singhania et al., 2024) finds
    attention keys low-rank in this sense.

    keys: (N, Hkv, D) calibration keys (the first keys a layer writes, in the plugin). Returns
    (Hkv, D, D) float32, orthonormal rows (computed in float64). Signs are fixed (each row's largest
    entry positive) so the same keys give the same basis on every device.
    """
    if keys.dim() != 3 or keys.shape[0] < 1:
        raise ValueError(f"keys must be (N, Hkv, D) with N >= 1; got {tuple(keys.shape)}")
    k = keys.double().transpose(0, 1)  # (Hkv, N, D)
    moment = k.transpose(1, 2) @ k / k.shape[1]  # (Hkv, D, D)
    eigvecs = torch.linalg.eigh(moment.cpu())[1].flip(-1)  # (Hkv, D, D): columns by decreasing eigenvalue
    rows = eigvecs.transpose(1, 2)  # (Hkv, D, D): rows are directions
    sign = torch.sign(rows.gather(-1, rows.abs().argmax(-1, keepdim=True)))
    return (rows * sign).float().to(keys.device).contiguous()


def set_index_basis(index: SparseIndex, basis: Tensor) -> None:
    """Install a calibrated basis (Hkv, Dk, Dk) (`choose_index_basis`), with the token index on its
    `index_channels` leading rows. In place when the index holds one (`allocate_index` makes the identity
    for `index_basis="pca"`), so CUDA graphs captured before calibration use it. Summaries and codes
    written before this are stale."""
    num_kv_heads, head_dim = index.block_min.shape[2], index.block_min.shape[3]
    if basis.shape != (num_kv_heads, head_dim, head_dim):
        raise ValueError(f"basis must have shape {(num_kv_heads, head_dim, head_dim)}; got {tuple(basis.shape)}")
    if index.basis is None:
        index.basis = basis.to(device=index.block_min.device, dtype=torch.float32).contiguous()
    else:
        index.basis.copy_(basis)
    C = index.channel_ids.shape[1]
    index.channel_ids.copy_(torch.arange(C, device=index.channel_ids.device).expand(num_kv_heads, C))


def calibrate_index(index: SparseIndex, keys: Tensor, config: SparseAttentionConfig) -> None:
    """Calibrate the index on keys (N, Hkv, D) as `config.index_basis` says: a basis
    (`choose_index_basis`, "pca") or channels (`choose_index_channels` by `config.index_channel_metric`)."""
    if config.index_basis == "pca":
        set_index_basis(index, choose_index_basis(keys))
    else:
        set_index_channels(index, choose_index_channels(keys, config.index_channels, metric=config.index_channel_metric))


def rotate_keys(key: Tensor, index: SparseIndex) -> Tensor:
    """Keys (N, Hkv, D) in the index's coordinates, cast to `index.key_dtype`: `basis[h] @ k` in float32
    (the keys themselves without a basis)."""
    if index.basis is None:
        return key.to(index.key_dtype)
    return torch.einsum("hed,nhd->nhe", index.basis, key.to(index.key_dtype).float()).to(index.key_dtype)


def rotate_query(query: Tensor, index: SparseIndex) -> Tensor:
    """The query (B, Hq, D) in the index's coordinates, in its own dtype: q head h by `basis[h // G]` in
    float32 (the query itself without a basis). What both selections score; attention uses the query."""
    if index.basis is None:
        return query
    B, Hq, D = query.shape
    Hkv = index.basis.shape[0]
    q = query.float().view(B, Hkv, Hq // Hkv, D)
    return torch.einsum("hed,bhgd->bhge", index.basis, q).reshape(B, Hq, D).to(query.dtype)


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for a quantised index (16 means exact keys, no codes); got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_index(keys_c: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Signed symmetric quantisation per token and head.

    keys_c: (..., C) the index channels of some keys, e.g. (N, Hkv, C).
    Returns codes (..., C * bits // 8) uint8 (stored value `q + qmax + 1`; 4 bits: channel 2i in the
    low nibble) and scales (...) float32 `max_c |k_c| / qmax` (0 for an all-zero key, which decodes to 0).
    """
    qmax = _qmax(bits)
    x = keys_c.float()
    scales = x.abs().amax(dim=-1) / qmax  # (...)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-qmax, qmax)
    stored = (q + (qmax + 1)).to(torch.uint8)  # (..., C) in [1, 2 qmax + 1]
    if bits == 4:
        if stored.shape[-1] % 2:
            raise ValueError(f"4-bit codes need an even channel count; got {stored.shape[-1]}")
        stored = stored[..., 0::2] | (stored[..., 1::2] << 4)  # (..., C // 2)
    return stored, scales


def dequantize_index(codes: Tensor, scales: Tensor, bits: int, num_channels: int) -> Tensor:
    """Inverse of `quantize_index`: codes (..., C * bits // 8) uint8, scales (...) -> (..., C) float32."""
    qmax = _qmax(bits)
    if bits == 4:
        low = codes & 0x0F
        high = codes >> 4
        stored = torch.stack((low, high), dim=-1).flatten(-2)  # (..., C)
    else:
        stored = codes
    stored = stored[..., :num_channels]
    return (stored.float() - (qmax + 1)) * scales.float().unsqueeze(-1)


def quantize_summary(block_min: Tensor, block_max: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Block summaries to int8 codes rounded outward, exactly, one scale per summary row.

    block_min, block_max: (..., D) float32. Returns code_min, code_max (..., D) int8 and scale (...)
    float32: `amax / 127` (amax = `max_d max(|min_d|, |max_d|)`), moved up to the next float32 where
    `127 * scale` falls short of amax, so the extreme channel's code +-127 reaches it.
    Codes: a first guess `floor(min / scale + TOL)`, `ceil(max / scale - TOL)` (TOL = `SUMMARY_TOL`),
    then one code outward where it misses: `code_min -= 1` if `code_min * scale > min`, `code_max += 1`
    if `code_max * scale < max`; then clamped to [-127, 127], which never binds (every |min|, |max| is
    <= amax <= 127 * scale). So the dequantised summary (`code * scale`, the one float32 multiply of
    `dequantize_summary`) bounds the row exactly per channel, `code_min * scale <= min` and
    `code_max * scale >= max`, with the tightest such codes (one code inward would miss). The float32
    product, not the exact one, is compared: a merge dequantises to it, so comparing anything else would
    move a stored code when it is requantised.
    Requantising a dequantised summary under an unchanged scale gives back the same codes (the first
    guess is the stored code, float32 `(c * s) / s` being within TOL of c, and `c * s` is the value
    compared), and the dequantised row gives back its scale (checked for every float32 amax whose
    `127 * scale` does not overflow). An all-zero row stores scale 0 and codes 0 (it decodes to 0).
    Every operation is one correctly rounded float32 operation (no fused multiply-add), so the Triton
    writer (`index_write.py`) reproduces it bit for bit.
    """
    amax = torch.maximum(block_min.abs(), block_max.abs()).amax(dim=-1)  # (...)
    scale = amax / SUMMARY_QMAX
    scale = torch.where(scale * SUMMARY_QMAX < amax, torch.nextafter(scale, torch.full_like(scale, math.inf)),
                        scale)  # one step up at most: fl(amax / 127) is within half a step of amax / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)  # (..., 1)
    code_min = torch.floor(block_min / safe + SUMMARY_TOL)  # (..., D): first guess, idempotent
    code_max = torch.ceil(block_max / safe - SUMMARY_TOL)
    step = scale.unsqueeze(-1)  # (..., 1): the correction compares what dequantize_summary computes
    code_min = torch.where(code_min * step > block_min, code_min - 1, code_min).clamp_(-SUMMARY_QMAX, SUMMARY_QMAX)
    code_max = torch.where(code_max * step < block_max, code_max + 1, code_max).clamp_(-SUMMARY_QMAX, SUMMARY_QMAX)
    return code_min.to(torch.int8), code_max.to(torch.int8), scale


def dequantize_summary(codes: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `quantize_summary`: codes (..., D) int8, scale (...) float32 -> (..., D) float32."""
    return codes.float() * scale.unsqueeze(-1)


def write_index(index: SparseIndex, key: Tensor, slot_mapping: Tensor, config: SparseAttentionConfig) -> None:
    """Fold new keys into the index, in place (call it where vLLM writes the KV cache).

    key: (N, Hkv, D); slot_mapping: (N,) int64 `physical_block * cache_block_size + offset`, negative
    slots skipped. Keys are cast to `index.key_dtype` (then float32), rotated first by `index.basis`
    if set (`rotate_keys`). A token at `offset % selection_block_size == 0` starts a fresh summary, the
    others min/max-merge into it.
    Within one call, a summary that some token of the call resets becomes the min/max over the call's
    tokens of that selection block; otherwise the call's tokens merge into the stored summary,
    dequantised (`code * scale`). The merged float32 min / max are then requantised by
    `quantize_summary` (a new scale per selection block and kv head, min rounded down, max up), so the
    stored summary bounds every key of its block exactly (per channel, as float32 values).
    Prefill (many tokens of a block at once) quantises the exact min / max once. Decode (one token at a
    time) requantises what is stored: while the scale is unchanged the codes of channels the token does
    not extend stay exactly as they were (`quantize_summary` is idempotent), but each growth of the
    scale re-rounds them outward, by at most one code. So writing a block token by token may give
    looser summaries than writing it at once (never tighter, and both exact bounds). Token codes do not
    depend on the call's split.
    """
    S = config.selection_block_size
    per_block = index.blocks_per_cache_block
    cache_block_size = per_block * S
    num_kv_heads, head_dim = index.block_min.shape[2], index.block_min.shape[3]
    assert all(t.is_contiguous() for t in (index.block_min, index.block_max, index.block_scale)), \
        "allocate_index makes them contiguous"

    # Dropping padded slots has a data-dependent shape (a host sync on GPU): fine on the CPU path.
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()  # (n,)
    k = rotate_keys(key[valid], index)  # (n, Hkv, D), key_dtype
    block = slots // cache_block_size
    offset = slots % cache_block_size
    group = block * per_block + offset // S  # flat (cache block, selection block) id, (n,)

    # Reduce the call's tokens per touched summary first, then merge with (or replace) the stored
    # one, so the cost is O(tokens), never O(cache). index_reduce_ into a small buffer, not
    # scatter_reduce_ into the index: the latter measured 50 ms for one token on this CPU.
    # torch flags index_reduce_ as beta; amin / amax are all we use of it.
    touched, member = torch.unique(group, return_inverse=True)  # (m,), (n,)
    kf = k.float()  # (n, Hkv, D): exact, min / max commute with the cast
    fresh_min = kf.new_full((touched.numel(), num_kv_heads, head_dim), float("inf"))
    fresh_max = kf.new_full((touched.numel(), num_kv_heads, head_dim), float("-inf"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")
        fresh_min.index_reduce_(0, member, kf, "amin", include_self=True)  # (m, Hkv, D)
        fresh_max.index_reduce_(0, member, kf, "amax", include_self=True)
    reset = torch.zeros(touched.numel(), dtype=torch.bool, device=k.device)
    reset[member[offset % S == 0]] = True  # some token of the call starts this summary afresh
    reset = reset.view(-1, 1, 1)

    flat_min = index.block_min.view(-1, num_kv_heads, head_dim)  # (num_cache_blocks * per_block, Hkv, D)
    flat_max = index.block_max.view(-1, num_kv_heads, head_dim)
    flat_scale = index.block_scale.view(-1, num_kv_heads)  # (num_cache_blocks * per_block, Hkv)
    old_scale = flat_scale[touched]  # (m, Hkv)
    merged_min = torch.where(reset, fresh_min, torch.minimum(dequantize_summary(flat_min[touched], old_scale),
                                                             fresh_min))  # (m, Hkv, D)
    merged_max = torch.where(reset, fresh_max, torch.maximum(dequantize_summary(flat_max[touched], old_scale),
                                                             fresh_max))
    flat_min[touched], flat_max[touched], flat_scale[touched] = quantize_summary(merged_min, merged_max)

    if index.codes is not None:
        channels = index.channel_ids.unsqueeze(0).expand(k.shape[0], -1, -1)  # (n, Hkv, C)
        codes, scales = quantize_index(k.gather(-1, channels), config.index_bits)
        index.codes[block, offset] = codes
        index.scales[block, offset] = scales


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _grouped_query(query: Tensor, num_kv_heads: int) -> Tensor:
    """(B, Hq, D) -> (B, Hkv, G, D) float32: q head h sits in group h // G."""
    B, Hq, D = query.shape
    if Hq % num_kv_heads:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {num_kv_heads}")
    return query.float().view(B, num_kv_heads, Hq // num_kv_heads, D)


def _gather_tokens(cache: Tensor, block_table: Tensor, positions: Tensor) -> Tensor:
    """Rows of a paged cache at logical positions.

    cache: (num_cache_blocks, cache_block_size, Hkv, X), any strides; block_table: (B, W);
    positions: (B, Hkv, P) logical positions, all valid (callers clamp pads to 0 and mask later).
    Returns (B, Hkv, P, X) in the cache dtype.
    """
    B, Hkv, P = positions.shape
    cache_block_size = cache.shape[1]
    pos = positions.long()
    logical_block = (pos // cache_block_size).view(B, Hkv * P)
    physical = block_table.long().gather(1, logical_block).view(B, Hkv, P)
    heads = torch.arange(Hkv, device=cache.device).view(1, Hkv, 1)
    return cache[physical, pos % cache_block_size, heads]


def group_temperature(softmax_scale: float | None, head_dim: int) -> float:
    """The "lse" temperature: the attention's softmax scale, `1 / sqrt(head_dim)` when not given."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a float > 0; got {softmax_scale!r}")
    return float(softmax_scale)


def _combine_group(scores: Tensor, config: SparseAttentionConfig, temperature: float) -> Tensor:
    """Per-head scores (B, Hkv, G, N) float32 -> one score per kv head (B, Hkv, N) by `config.group_score`:
    "lse" `logsumexp_h(t * s_h) / t` (in q.k units, t the softmax scale), "max" `max_h s_h`."""
    if config.group_score == "max":
        return scores.amax(dim=2)
    return (scores * temperature).logsumexp(dim=2) / temperature


def _is_candidate(positions: Tensor, seq_lens: Tensor, config: SparseAttentionConfig) -> Tensor:
    """positions (B, Hkv, P) -> bool: inside [sink_tokens, L - local_tokens), the selectable range."""
    end = (seq_lens.long() - config.local_tokens).view(-1, 1, 1)
    return (positions >= config.sink_tokens) & (positions < end)


def _topk_ids(scores: Tensor, ids: Tensor, k: int, width: int) -> Tensor:
    """Top `k` of `scores` (B, Hkv, M), returning `ids` (B, Hkv, M) at those places as (B, Hkv, width)
    int32, ascending, -1 for -inf scores and padding (pads last)."""
    k = min(k, scores.shape[-1])
    top, where = scores.topk(k, dim=-1)
    chosen = torch.where(top > NEG_INF, ids.gather(-1, where), torch.full_like(where, -1))
    if k < width:
        chosen = torch.cat([chosen, chosen.new_full((*chosen.shape[:-1], width - k), -1)], dim=-1)
    big = torch.iinfo(torch.int64).max
    chosen = chosen.long()
    chosen = torch.where(chosen < 0, big, chosen).sort(dim=-1).values
    return torch.where(chosen == big, -1, chosen).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Level 1: blocks
# ----------------------------------------------------------------------------------------------


def score_blocks(
    query: Tensor, index: SparseIndex, block_table: Tensor, seq_lens: Tensor, config: SparseAttentionConfig,
    softmax_scale: float | None = None,
) -> Tensor:
    """Quest bound of every logical selection block, combined over the GQA group (`config.group_score`).

    query: (B, Hq, Dk); block_table: (B, W) int32; seq_lens: (B,) int32; softmax_scale: the "lse"
    temperature (default 1 / sqrt(Dk)).
    Returns (B, Hkv, W * cache_block_size // selection_block_size) float32; -inf for blocks holding
    no candidate position (beyond seq_len, or wholly inside the sinks / local window).
    The summaries are dequantised (`code * block_scale`): they bound every key of the block exactly
    (`quantize_summary`), so each head's bound is >= `q . k` of every key of the block up to the dot
    products' float32 rounding. With `config.block_bound_weight` w < 1 a head's score is
    `w * bound + (1 - w) * q . (min + max) / 2`, no longer an upper bound.
    """
    S = config.selection_block_size
    per_block = index.blocks_per_cache_block
    B, W = block_table.shape
    num_kv_heads, head_dim = index.block_min.shape[2], index.block_min.shape[3]
    physical = block_table.long().clamp(min=0)  # padded table entries point at block 0, masked below
    block_scale = index.block_scale[physical]  # (B, W, per_block, Hkv)
    mins = dequantize_summary(index.block_min[physical], block_scale)  # (B, W, per_block, Hkv, D) float32
    maxs = dequantize_summary(index.block_max[physical], block_scale)
    mins = mins.view(B, W * per_block, num_kv_heads, head_dim)  # (B, NS, Hkv, D)
    maxs = maxs.view(B, W * per_block, num_kv_heads, head_dim)
    q = _grouped_query(rotate_query(query, index), num_kv_heads)  # (B, Hkv, G, D), the index's coordinates
    bound = torch.einsum("bhgd,bnhd->bhgn", q.clamp(min=0), maxs) + torch.einsum(
        "bhgd,bnhd->bhgn", q.clamp(max=0), mins
    )  # (B, Hkv, G, NS)
    w = float(config.block_bound_weight)
    if w != 1.0:  # toward the midpoint's score: q . (min + max) / 2
        mid = torch.einsum("bhgd,bnhd->bhgn", q, mins + maxs) * 0.5
        bound = w * bound + (1.0 - w) * mid
    bound = _combine_group(bound, config, group_temperature(softmax_scale, head_dim))  # (B, Hkv, NS)

    start = torch.arange(W * per_block, device=query.device).view(1, -1) * S  # (1, NS)
    first = torch.clamp(start, min=config.sink_tokens)
    end = torch.minimum(start + S, (seq_lens.long() - config.local_tokens).view(-1, 1))  # (B, NS)
    has_candidate = first < end
    return bound.masked_fill(~has_candidate.unsqueeze(1), NEG_INF)


@functools.lru_cache(maxsize=None)
def lagged_block_config(config: SparseAttentionConfig) -> SparseAttentionConfig:
    """The config a lagged step's block stage ranks with: its blocks serve the next step, whose
    selectable range [sink_tokens, L + 1 - local_tokens) ends one token later. Unchanged without a
    local window (the next step's newest token is not written yet)."""
    return config.with_(local_tokens=config.local_tokens - 1) if config.local_tokens > 0 else config


def select_blocks(
    query: Tensor, index: SparseIndex, block_table: Tensor, seq_lens: Tensor, config: SparseAttentionConfig,
    softmax_scale: float | None = None,
) -> Tensor:
    """Top `num_blocks` selection blocks by bound: (B, Hkv, num_blocks) int32 logical block ids
    (block j holds positions [j S, (j+1) S)), ascending, -1 padded."""
    scores = score_blocks(query, index, block_table, seq_lens, config, softmax_scale)
    ids = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    return _topk_ids(scores, ids, config.num_blocks, config.num_blocks)


# ----------------------------------------------------------------------------------------------
# Level 2: tokens
# ----------------------------------------------------------------------------------------------


def _index_scores(
    query: Tensor, index: SparseIndex, key_cache: Tensor, block_table: Tensor, positions: Tensor,
    config: SparseAttentionConfig, softmax_scale: float | None = None,
) -> Tensor:
    """Token-index score of valid `positions` (B, Hkv, P), combined over the group: (B, Hkv, P) float32."""
    num_kv_heads = positions.shape[1]
    # Codes are in the index's coordinates; 16 bits reads the cache's own keys.
    q = _grouped_query(query if config.index_bits == 16 else rotate_query(query, index), num_kv_heads)  # (B, Hkv, G, D)
    if config.index_bits == 16:
        keys = _gather_tokens(key_cache, block_table, positions).float()  # (B, Hkv, P, D)
        scores = torch.einsum("bhgd,bhpd->bhgp", q, keys)
    else:
        C = config.index_channels
        codes = _gather_tokens(index.codes, block_table, positions)  # (B, Hkv, P, C * bits // 8)
        scales = _gather_tokens(index.scales.unsqueeze(-1), block_table, positions).squeeze(-1)  # (B, Hkv, P)
        approx = dequantize_index(codes, scales, config.index_bits, C)  # (B, Hkv, P, C)
        channels = index.channel_ids.view(1, num_kv_heads, 1, C).expand(q.shape[0], -1, q.shape[2], -1)
        q_c = q.gather(-1, channels)  # (B, Hkv, G, C)
        scores = torch.einsum("bhgc,bhpc->bhgp", q_c, approx)
    return _combine_group(scores, config, group_temperature(softmax_scale, query.shape[-1]))


def score_tokens(
    query: Tensor, index: SparseIndex, key_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    block_ids: Tensor, config: SparseAttentionConfig, softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Token scores inside the kept blocks.

    block_ids: (B, Hkv, NB) int32 logical selection-block ids, -1 padded (any NB).
    Returns positions (B, Hkv, NB * S) int32 (-1 for padded blocks and positions >= seq_len) and
    scores (B, Hkv, NB * S) float32 (-inf wherever the position is not a candidate: padding, sinks,
    local window, beyond seq_len).
    """
    S = config.selection_block_size
    B, Hkv, NB = block_ids.shape
    blocks = block_ids.long().unsqueeze(-1)  # (B, Hkv, NB, 1)
    positions = (blocks * S + torch.arange(S, device=blocks.device)).view(B, Hkv, NB * S)
    real = (blocks >= 0).expand(-1, -1, -1, S).reshape(B, Hkv, NB * S) & (
        positions < seq_lens.long().view(-1, 1, 1)
    )
    candidate = real & _is_candidate(positions, seq_lens, config)
    safe = torch.where(candidate, positions, torch.zeros_like(positions))
    scores = _index_scores(query, index, key_cache, block_table, safe, config, softmax_scale)
    scores = scores.masked_fill(~candidate, NEG_INF)
    positions = torch.where(real, positions, torch.full_like(positions, -1)).to(torch.int32)
    return positions, scores


def select_tokens(
    query: Tensor, index: SparseIndex, key_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    block_ids: Tensor, config: SparseAttentionConfig, softmax_scale: float | None = None,
) -> Tensor:
    """Top `token_budget` candidates inside `block_ids`: (B, Hkv, token_budget) int32 positions,
    ascending, -1 padded."""
    positions, scores = score_tokens(query, index, key_cache, block_table, seq_lens, block_ids, config, softmax_scale)
    return _topk_ids(scores, positions, config.token_budget, config.token_budget)


def attended_positions(selected: Tensor, seq_lens: Tensor, config: SparseAttentionConfig) -> Tensor:
    """Everything one decode step attends to, per kv head.

    selected: (B, Hkv, K) positions, -1 padded. Returns (B, Hkv, sink_tokens + local_tokens + K) int32
    in fixed slots: sinks `[0, min(sink, L))`, then the local window `[max(L - local, sink), L)`, then
    the selected positions that are candidates; -1 wherever a slot is empty. No position twice.
    """
    B, Hkv, _ = selected.shape
    device = selected.device
    L = seq_lens.long().view(B, 1, 1)
    sinks = torch.arange(config.sink_tokens, device=device).view(1, 1, -1)
    sinks = torch.where(sinks < L, sinks, -1).expand(B, Hkv, -1)
    local = L - config.local_tokens + torch.arange(config.local_tokens, device=device).view(1, 1, -1)
    local = torch.where(local >= config.sink_tokens, local, -1).expand(B, Hkv, -1)  # also drops negatives
    chosen = selected.long()
    chosen = torch.where(_is_candidate(chosen, seq_lens, config), chosen, -1)
    return torch.cat([sinks, local, chosen], dim=-1).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Level 3: exact attention
# ----------------------------------------------------------------------------------------------


def _attend(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float) -> Tensor:
    """q (B, Hkv, G, D), keys (B, Hkv, P, D), values (B, Hkv, P, Dv) float32, valid (B, Hkv, P) bool
    -> (B, Hkv, G, Dv) float32. A row with no valid position gives zeros."""
    logits = torch.einsum("bhgd,bhpd->bhgp", q, keys) * scale
    logits = logits.masked_fill(~valid.unsqueeze(2), NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgp,bhpd->bhgd", probs, values)


def sparse_attention(
    query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """Exact attention over the attended positions.

    query: (B, Hq, Dk); key_cache / value_cache: (num_cache_blocks, cache_block_size, Hkv, Dk / Dv),
    any strides; positions: (B, Hkv, P) int32, -1 padded. Returns (B, Hq, Dv) in the query dtype.
    """
    B, Hq, _ = query.shape
    Hkv = positions.shape[1]
    valid = positions >= 0
    safe = positions.long().clamp(min=0)
    keys = _gather_tokens(key_cache, block_table, safe).float()  # (B, Hkv, P, Dk)
    values = _gather_tokens(value_cache, block_table, safe).float()  # (B, Hkv, P, Dv)
    out = _attend(_grouped_query(query, Hkv), keys, values, valid, scale)  # (B, Hkv, G, Dv)
    return out.reshape(B, Hq, -1).to(query.dtype)


def _whole_sequences(cache: Tensor, block_table: Tensor) -> Tensor:
    """(num_cache_blocks, cache_block_size, Hkv, X) -> (B, Hkv, W * cache_block_size, X): every
    position the block table can address, in logical order."""
    B, W = block_table.shape
    _, cache_block_size, Hkv, X = cache.shape
    rows = cache[block_table.long().clamp(min=0)]  # (B, W, cbs, Hkv, X)
    return rows.reshape(B, W * cache_block_size, Hkv, X).transpose(1, 2)


def dense_decode_attention(
    query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float
) -> Tensor:
    """The dense reference: every position `< seq_len`. Returns (B, Hq, Dv) in the query dtype."""
    B, Hq, _ = query.shape
    keys = _whole_sequences(key_cache, block_table).float()  # (B, Hkv, T, Dk)
    values = _whole_sequences(value_cache, block_table).float()  # (B, Hkv, T, Dv)
    Hkv, T = keys.shape[1], keys.shape[2]
    valid = (torch.arange(T, device=query.device).view(1, 1, T) < seq_lens.long().view(B, 1, 1)).expand(B, Hkv, T)
    out = _attend(_grouped_query(query, Hkv), keys, values, valid, scale)
    return out.reshape(B, Hq, -1).to(query.dtype)


# ----------------------------------------------------------------------------------------------
# Neighbours at the same token budget
# ----------------------------------------------------------------------------------------------


def _block_only_selection(
    query: Tensor, index: SparseIndex, block_table: Tensor, seq_lens: Tensor, config: SparseAttentionConfig,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Quest: keep `token_budget // S` blocks by bound and every candidate in them.
    Returns (selected (B, Hkv, token_budget), block_ids (B, Hkv, num_blocks)), int32, -1 padded."""
    S = config.selection_block_size
    kept = config.token_budget // S
    scores = score_blocks(query, index, block_table, seq_lens, config, softmax_scale)
    ids = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    blocks = _topk_ids(scores, ids, kept, kept)  # (B, Hkv, kept)
    B, Hkv, _ = blocks.shape
    positions = (blocks.long().unsqueeze(-1) * S + torch.arange(S, device=blocks.device)).view(B, Hkv, kept * S)
    real = (blocks >= 0).unsqueeze(-1).expand(-1, -1, -1, S).reshape(B, Hkv, kept * S)
    selected = torch.where(real & _is_candidate(positions, seq_lens, config), positions, -1)
    pad = config.token_budget - kept * S
    selected = torch.cat([selected, selected.new_full((B, Hkv, pad), -1)], dim=-1).to(torch.int32)
    block_ids = torch.cat([blocks, blocks.new_full((B, Hkv, config.num_blocks - kept), -1)], dim=-1)
    return selected, block_ids


def block_only_positions(
    query: Tensor, index: SparseIndex, block_table: Tensor, seq_lens: Tensor, config: SparseAttentionConfig,
    softmax_scale: float | None = None,
) -> Tensor:
    """Quest at the same token budget: (B, Hkv, attended_tokens) int32 positions like `attended_positions`."""
    selected, _ = _block_only_selection(query, index, block_table, seq_lens, config, softmax_scale)
    return attended_positions(selected, seq_lens, config)


def exact_topk_positions(
    query: Tensor, key_cache: Tensor, block_table: Tensor, seq_lens: Tensor, config: SparseAttentionConfig,
    softmax_scale: float | None = None,
) -> Tensor:
    """The oracle: exact `q . k` (combined over the group by `config.group_score`) over every
    candidate, top `token_budget`.
    Returns (B, Hkv, attended_tokens) int32 positions like `attended_positions`."""
    B, W = block_table.shape
    Hkv = key_cache.shape[2]
    T = W * key_cache.shape[1]
    keys = _whole_sequences(key_cache, block_table).float()  # (B, Hkv, T, Dk)
    scores = torch.einsum("bhgd,bhtd->bhgt", _grouped_query(query, Hkv), keys)  # (B, Hkv, G, T)
    scores = _combine_group(scores, config, group_temperature(softmax_scale, query.shape[-1]))  # (B, Hkv, T)
    positions = torch.arange(T, device=query.device).expand(B, Hkv, T)
    scores = scores.masked_fill(~_is_candidate(positions, seq_lens, config), NEG_INF)
    selected = _topk_ids(scores, positions, config.token_budget, config.token_budget)
    return attended_positions(selected, seq_lens, config)


# ----------------------------------------------------------------------------------------------
# One decode step
# ----------------------------------------------------------------------------------------------


def sparse_decode(
    query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    index: SparseIndex, config: SparseAttentionConfig, scale: float, previous_block_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step in `config.mode`.

    Returns (output (B, Hq, Dv) query dtype, positions, block_ids (B, Hkv, num_blocks) int32).
    positions is (B, Hkv, attended_tokens) int32, except in "dense" mode where it lists every
    addressable position (B, Hkv, W * cache_block_size), -1 beyond seq_len. block_ids are this step's
    block choice (all -1 for "exact_topk" and "dense"; the kept blocks for "block_only"). With
    `lagged_selection`, tokens are selected inside `previous_block_ids` (this step's blocks when None)
    and the returned block_ids are for the next step.
    """
    B = query.shape[0]
    Hkv = key_cache.shape[2]
    no_blocks = torch.full((B, Hkv, config.num_blocks), -1, dtype=torch.int32, device=query.device)
    if config.mode == "dense":
        T = block_table.shape[1] * key_cache.shape[1]
        all_positions = torch.arange(T, device=query.device).expand(B, Hkv, T)
        positions = torch.where(all_positions < seq_lens.long().view(B, 1, 1), all_positions, -1).to(torch.int32)
        out = dense_decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale)
        return out, positions, no_blocks
    if config.mode == "exact_topk":
        positions = exact_topk_positions(query, key_cache, block_table, seq_lens, config, scale)
        block_ids = no_blocks
    elif config.mode == "block_only":
        selected, block_ids = _block_only_selection(query, index, block_table, seq_lens, config, scale)
        positions = attended_positions(selected, seq_lens, config)
    else:  # "asynctls"
        block_config = lagged_block_config(config) if config.lagged_selection else config
        block_ids = select_blocks(query, index, block_table, seq_lens, block_config, scale)
        token_blocks = block_ids
        if config.lagged_selection and previous_block_ids is not None:
            token_blocks = previous_block_ids
        selected = select_tokens(query, index, key_cache, block_table, seq_lens, token_blocks, config, scale)
        positions = attended_positions(selected, seq_lens, config)
    out = sparse_attention(query, key_cache, value_cache, block_table, positions, scale)
    return out, positions, block_ids


# ----------------------------------------------------------------------------------------------
# Lagged selection across steps: each request's block choice, kept between decode steps
# ----------------------------------------------------------------------------------------------
# A serving engine moves requests between batch rows, so the previous step's block ids are kept per
# selection-block slot of the paged cache: `state_ids` (num_slots + 1, Hkv, num_blocks) int32 and
# `written` (num_slots + 1, 2) int32, num_slots = num_cache_blocks * cache_block_size / S, the last
# entry a sink for padded rows. A step records its choice at the slot of its newest token (position
# L - 1) with its length L and its owner tag (the physical block of its position 0); the next step
# reads the slot of its position L - 2 and uses it only if it was written at length L - 1 by the same
# owner, else it falls back to its most recent blocks. `hits` (optional, int64 scalar) counts the rows
# that used an entry.


def lagged_slots(block_table: Tensor, positions: Tensor, cache_block_size: int, selection_block_size: int) -> Tensor:
    """Selection-block slot of each row's `positions` (B,) int64 >= 0 in the paged cache -> (B,) int64."""
    rows = torch.arange(block_table.shape[0], device=block_table.device)
    cache_block = block_table[rows, positions // cache_block_size].long()
    per = cache_block_size // selection_block_size
    return cache_block * per + (positions % cache_block_size) // selection_block_size


def recent_block_ids(seq_lens: Tensor, config: SparseAttentionConfig, num_kv_heads: int) -> Tensor:
    """(B,) lengths -> (B, Hkv, num_blocks) int32: the `num_blocks` selection blocks that end the
    selectable range [sink_tokens, L - local_tokens), ascending, -1 padded."""
    S = config.selection_block_size
    last = torch.div(seq_lens.long() - config.local_tokens - 1, S, rounding_mode="floor")  # (B,)
    first = (last - config.num_blocks + 1).clamp(min=0)
    ids = first.unsqueeze(1) + torch.arange(config.num_blocks, device=seq_lens.device)  # (B, NB)
    ids = torch.where(ids <= last.unsqueeze(1), ids, -1).to(torch.int32)
    return ids.unsqueeze(1).expand(-1, num_kv_heads, -1).contiguous()


def previous_block_ids(state_ids: Tensor, written: Tensor, block_table: Tensor, seq_lens: Tensor,
                       config: SparseAttentionConfig, cache_block_size: int, hits: Tensor | None = None) -> Tensor:
    """The blocks each row's previous step recorded, or its most recent blocks where no entry of length
    L - 1 and the row's owner exists: (B, Hkv, num_blocks) int32. seq_lens (B,) count this step's token."""
    L = seq_lens.long()
    prev = lagged_slots(block_table, (L - 2).clamp(min=0), cache_block_size, config.selection_block_size)
    entry = written[prev].long()  # (B, 2): length, owner
    valid = (L >= 2) & (entry[:, 0] == L - 1) & (entry[:, 1] == block_table[:, 0].long())
    if hits is not None:
        hits += valid.sum()
    fallback = recent_block_ids(seq_lens, config, state_ids.shape[1])
    return torch.where(valid.view(-1, 1, 1), state_ids[prev], fallback).contiguous()


def record_block_ids(state_ids: Tensor, written: Tensor, block_table: Tensor, seq_lens: Tensor,
                     block_ids: Tensor, config: SparseAttentionConfig, cache_block_size: int) -> None:
    """Keep this step's block choice (B, Hkv, num_blocks) at each row's newest-token slot, in place;
    padded rows (seq_len 0) write the last entry, which no slot maps to."""
    L = seq_lens.long()
    slots = lagged_slots(block_table, (L - 1).clamp(min=0), cache_block_size, config.selection_block_size)
    cur = torch.where(L > 0, slots, state_ids.shape[0] - 1)
    state_ids[cur] = block_ids.to(torch.int32)
    written[cur] = torch.stack([seq_lens.to(torch.int32), block_table[:, 0].to(torch.int32)], dim=1)


def attention_mass_recall(
    query: Tensor, key_cache: Tensor, block_table: Tensor, seq_lens: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """Share of the dense softmax mass that `positions` (B, Hkv, P), -1 padded, hold; averaged over
    the group's q heads: (B, Hkv) float32 in [0, 1]."""
    B = query.shape[0]
    keys = _whole_sequences(key_cache, block_table).float()  # (B, Hkv, T, Dk)
    Hkv, T = keys.shape[1], keys.shape[2]
    logits = torch.einsum("bhgd,bhtd->bhgt", _grouped_query(query, Hkv), keys) * scale
    in_seq = torch.arange(T, device=query.device).view(1, 1, T) < seq_lens.long().view(B, 1, 1)
    probs = torch.softmax(logits.masked_fill(~in_seq.unsqueeze(2), NEG_INF), dim=-1)  # (B, Hkv, G, T)
    # Pads scatter into an extra column that is dropped; a repeated position counts once.
    attended = torch.zeros(B, Hkv, T + 1, device=query.device)
    attended.scatter_(-1, torch.where(positions >= 0, positions.long(), T), 1.0)
    return (probs * attended[..., :T].unsqueeze(2)).sum(-1).mean(dim=2)


def mass_optimal_positions(
    query: Tensor, key_cache: Tensor, block_table: Tensor, seq_lens: Tensor, config: SparseAttentionConfig,
    scale: float,
) -> Tensor:
    """An evaluation bound, not a selection method (it needs the dense softmax): the `token_budget`
    candidates holding the most dense attention mass summed over the group's q heads. Recall is that
    mass averaged over the heads, so no selection of `token_budget` candidates (with the same sinks and
    local window) holds more. Returns (B, Hkv, attended_tokens) int32 like `attended_positions`."""
    B, W = block_table.shape
    keys = _whole_sequences(key_cache, block_table).float()  # (B, Hkv, T, Dk)
    Hkv, T = keys.shape[1], keys.shape[2]
    logits = torch.einsum("bhgd,bhtd->bhgt", _grouped_query(query, Hkv), keys) * scale
    positions = torch.arange(T, device=query.device).expand(B, Hkv, T)
    in_seq = positions < seq_lens.long().view(B, 1, 1)
    mass = torch.softmax(logits.masked_fill(~in_seq.unsqueeze(2), NEG_INF), dim=-1).sum(dim=2)  # (B, Hkv, T)
    mass = mass.masked_fill(~_is_candidate(positions, seq_lens, config), NEG_INF)
    selected = _topk_ids(mass, positions, config.token_budget, config.token_budget)
    return attended_positions(selected, seq_lens, config)
