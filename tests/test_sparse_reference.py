"""The AsyncTLS plain-PyTorch reference against brute force written out plainly here.

Every case uses a shuffled block table over a cache full of garbage, ragged sequence lengths (one
shorter than the token budget, one with a partly filled last block) and an index pre-filled with junk,
so a missed summary reset or a wrong physical block shows up. Selections are compared as sets against
loops over all positions; outputs against dense attention in float32.
"""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, dataclass

import pytest
import torch
from torch import Tensor

from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig


# ----------------------------------------------------------------------------------------------
# Building cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    query: torch.Tensor  # (B, Hq, D)
    key_cache: torch.Tensor  # (num_cache_blocks, cbs, Hkv, D)
    value_cache: torch.Tensor  # (num_cache_blocks, cbs, Hkv, Dv), a view of key_cache for MLA
    block_table: torch.Tensor  # (B, W) int32
    seq_lens: torch.Tensor  # (B,) int32
    keys: list[torch.Tensor]  # per sequence (L, Hkv, D): the logical keys, for brute force
    values: list[torch.Tensor]  # per sequence (L, Hkv, Dv)
    slots: torch.Tensor  # (N,) int64 slot mapping of every token, -1 pads interleaved
    flat_keys: torch.Tensor  # (N, Hkv, D) keys in slot order

    @property
    def group(self) -> int:
        return self.query.shape[1] // self.key_cache.shape[2]


def build_case(
    seq_lens, cbs, num_kv_heads, group, head_dim, value_dim=None, mla=False, seed=0, keys_fn=None, query=None
) -> Case:
    """A batch with a shuffled block table. `keys_fn(L, gen) -> (L, Hkv, D)` plants structure."""
    gen = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    width = max(math.ceil(L / cbs) for L in seq_lens)
    num_cache_blocks = B * width + 3
    block_table = torch.randperm(num_cache_blocks, generator=gen)[: B * width].view(B, width).to(torch.int32)
    value_dim = value_dim or head_dim
    key_cache = torch.randn(num_cache_blocks, cbs, num_kv_heads, head_dim, generator=gen)  # garbage everywhere
    if mla:
        assert num_kv_heads == 1
        value_cache = key_cache[..., :value_dim]  # the latent part, a view
    else:
        value_cache = torch.randn(num_cache_blocks, cbs, num_kv_heads, value_dim, generator=gen)
    keys, values, slots, flat = [], [], [], []
    for b, L in enumerate(seq_lens):
        k = keys_fn(L, gen) if keys_fn else torch.randn(L, num_kv_heads, head_dim, generator=gen)
        pos = torch.arange(L)
        slot = block_table[b].long()[pos // cbs] * cbs + pos % cbs
        key_cache.view(-1, num_kv_heads, head_dim)[slot] = k
        keys.append(k)
        slots.append(slot)
        flat.append(k)
    for b, L in enumerate(seq_lens):
        pos = torch.arange(L)
        values.append(value_cache[block_table[b].long()[pos // cbs], pos % cbs].clone())
    slots = torch.cat(slots)
    flat = torch.cat(flat)
    # Padding slots (-1) interleaved, with junk keys, must be skipped.
    pad_at = torch.randint(0, slots.numel(), (5,), generator=gen)
    for i in sorted(pad_at.tolist(), reverse=True):
        slots = torch.cat([slots[:i], torch.tensor([-1]), slots[i:]])
        flat = torch.cat([flat[:i], torch.full((1, num_kv_heads, head_dim), 1e3), flat[i:]])
    if query is None:
        query = torch.randn(B, num_kv_heads * group, head_dim, generator=gen)
    return Case(query, key_cache, value_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32),
                keys, values, slots, flat)


def fill_summaries_with_junk(index: ref.SparseIndex, gen: torch.Generator, scale_max: float = 1.0) -> None:
    """Valid-looking but wrong summaries (int8 codes, scales in [0, scale_max)), so a missed reset shows
    up. Also used by tests/test_triton_kernels.py."""
    index.block_min.copy_(torch.randint(-127, 128, index.block_min.shape, generator=gen, dtype=torch.int8))
    index.block_max.copy_(torch.randint(-127, 128, index.block_max.shape, generator=gen, dtype=torch.int8))
    index.block_scale.copy_(torch.rand(index.block_scale.shape, generator=gen) * scale_max)


def build_index(case: Case, config: SparseAttentionConfig, calibrate=True, seed=1) -> ref.SparseIndex:
    """Index pre-filled with junk (so resets matter), calibrated channels (or, with
    `index_basis="pca"`, a calibrated basis), then one prefill write."""
    ncb, cbs, hkv, d = case.key_cache.shape
    index = ref.allocate_index(ncb, cbs, hkv, d, config, torch.float32, "cpu")
    fill_summaries_with_junk(index, torch.Generator().manual_seed(seed), scale_max=0.1)
    if calibrate:
        ref.calibrate_index(index, torch.cat(case.keys), config)
    ref.write_index(index, case.flat_keys, case.slots, config)
    return index


# (cache block size, selection block size, Hkv, group, D, Dv, mla, index bits, index channels)
SHAPES = {
    "c16s16-mha-exact": (16, 16, 1, 1, 32, 32, False, 16, 8),
    "c64s16-gqa4-4bit": (64, 16, 2, 4, 32, 24, False, 4, 8),
    "c64s64-gqa4-8bit": (64, 64, 2, 4, 32, 32, False, 8, 12),
    "c64s16-hkv4-4bit": (64, 16, 4, 1, 16, 16, False, 4, 8),
    "c16s16-mla-4bit": (16, 16, 1, 4, 96, 64, True, 4, 16),
}


def shape_case(name, seed=0, long_blocks=11, **config_overrides):
    cbs, S, hkv, group, d, dv, mla, bits, channels = SHAPES[name]
    # Ragged: a long one with a partly filled last block, one shorter than the budget, one in between.
    seq_lens = [long_blocks * S + S // 2 + 3, 45, 5 * S + 1]
    case = build_case(seq_lens, cbs, hkv, group, d, dv, mla=mla, seed=seed)
    knobs = dict(selection_block_size=S, num_blocks=6, token_budget=5 * S // 2 + 1, sink_tokens=21,
                 local_tokens=S + 3, index_channels=channels, index_bits=bits)
    knobs.update(config_overrides)
    return case, SparseAttentionConfig(**knobs)


# ----------------------------------------------------------------------------------------------
# Brute force, written out plainly
# ----------------------------------------------------------------------------------------------


def is_candidate(p, L, config):
    return config.sink_tokens <= p < L - config.local_tokens


def brute_combine(scores, config, head_dim, softmax_scale=None):
    """The group's heads' scores (a list of floats) combined as `config.group_score` says, in float64:
    "max" the largest; "lse" log(sum_h exp(t s_h)) / t, t the softmax scale (default 1 / sqrt(D))."""
    if config.group_score == "max":
        return max(scores)
    t = softmax_scale or 1.0 / math.sqrt(head_dim)
    top = max(scores)
    return top + math.log(sum(math.exp(t * (s - top)) for s in scores)) / t


def brute_summary(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One selection block's summary as written in one call, quantisation redone here: keys (n, D)
    -> dequantised (min, max) (D,) float32, int8 codes of scale amax / 127 (amax = max_d max(|min_d|,
    |max_d|)), one float32 step up if 127 * scale < amax; codes: the reference's TOL first guess, then
    one code outward where code * scale misses (min rounded down and max up, exactly)."""
    kmin, kmax = keys.float().min(dim=0).values, keys.float().max(dim=0).values
    amax = torch.maximum(kmin.abs(), kmax.abs()).max()
    scale = amax / 127
    if scale * 127 < amax:
        scale = torch.nextafter(scale, torch.tensor(math.inf))
    if scale == 0:
        return torch.zeros_like(kmin), torch.zeros_like(kmax)
    code_min = torch.floor(kmin / scale + ref.SUMMARY_TOL)
    code_max = torch.ceil(kmax / scale - ref.SUMMARY_TOL)
    code_min = torch.where(code_min * scale > kmin, code_min - 1, code_min)
    code_max = torch.where(code_max * scale < kmax, code_max + 1, code_max)
    assert code_min.abs().max() <= 127 and code_max.abs().max() <= 127
    return code_min * scale, code_max * scale


def brute_block_scores(case: Case, config: SparseAttentionConfig, softmax_scale=None):
    """{(b, h): {block: bound}} over blocks that hold a candidate, from the logical keys."""
    S, G = config.selection_block_size, case.group
    out = {}
    for b, k in enumerate(case.keys):
        L = k.shape[0]
        for h in range(k.shape[1]):
            scores = {}
            for j in range(math.ceil(L / S)):
                members = list(range(j * S, min((j + 1) * S, L)))
                if not any(is_candidate(p, L, config) for p in members):
                    continue
                kmin, kmax = brute_summary(k[members, h])
                bounds = []
                w = config.block_bound_weight
                for g in range(G):
                    q = case.query[b, h * G + g]
                    bound = sum(max(q[d] * kmin[d], q[d] * kmax[d]).item() for d in range(q.shape[0]))
                    mid = sum((q[d] * (kmin[d] + kmax[d]) / 2).item() for d in range(q.shape[0]))
                    bounds.append(w * bound + (1 - w) * mid)
                scores[j] = brute_combine(bounds, config, case.query.shape[-1], softmax_scale)
            out[b, h] = scores
    return out


def brute_token_score(case, config, channel_ids, b, h, p, softmax_scale=None):
    """The group's combined q . k (exact) or q_c . dequant(k_c) (quantised), quantisation redone here."""
    k = case.keys[b][p, h]
    if config.index_bits == 16:
        approx, chans = k, torch.arange(k.shape[0])
    else:
        chans = channel_ids[h]
        qmax = 2 ** (config.index_bits - 1) - 1
        kc = k[chans]
        scale = kc.abs().max() / qmax
        approx = torch.zeros_like(kc) if scale == 0 else torch.clamp(torch.round(kc / scale), -qmax, qmax) * scale
    G = case.group
    heads = [float((case.query[b, h * G + g][chans] * approx).sum()) for g in range(G)]
    return brute_combine(heads, config, case.query.shape[-1], softmax_scale)


def assert_topk_set(got: set, scored: dict, k: int, tol=1e-4):
    """`got` is a top-k of `scored`, up to ties within `tol` at the boundary."""
    assert got <= set(scored), f"selected non-candidates {got - set(scored)}"
    ranked = sorted(scored.items(), key=lambda kv: -kv[1])
    want = {p for p, _ in ranked[:k]}
    assert len(got) == len(want)
    if got != want:
        kth = ranked[len(want) - 1][1]
        for p in got ^ want:
            assert abs(scored[p] - kth) <= tol, f"position {p} score {scored[p]} vs boundary {kth}"


def ids(row: torch.Tensor) -> set:
    vals = [int(x) for x in row.tolist() if x >= 0]
    assert len(vals) == len(set(vals)), f"duplicates in {vals}"
    return set(vals)


def masked_dense(case: Case, attended: dict, scale: float) -> torch.Tensor:
    """Attention over {(b, h): set of positions}, looping over heads: (B, Hq, Dv) float32."""
    B, Hq, _ = case.query.shape
    G = case.group
    out = torch.zeros(B, Hq, case.value_cache.shape[-1])
    for b in range(B):
        for hq in range(Hq):
            h = hq // G
            pos = sorted(attended[b, h])
            logits = (case.keys[b][pos, h].double() @ case.query[b, hq].double()) * scale
            out[b, hq] = (torch.softmax(logits, 0) @ case.values[b][pos, h].double()).float()
    return out


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs, name",
    [
        (dict(selection_block_size=0), "selection_block_size"),
        (dict(selection_block_size=48), "selection_block_size"),
        (dict(selection_block_size=2048), "selection_block_size"),
        (dict(selection_block_size=True), "selection_block_size"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(num_blocks=2.5), "num_blocks"),
        (dict(token_budget=0), "token_budget"),
        (dict(token_budget=-3), "token_budget"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(sink_tokens="64"), "sink_tokens"),
        (dict(local_tokens=-1), "local_tokens"),
        (dict(index_channels=0), "index_channels"),
        (dict(index_channels=31, index_bits=4), "index_channels"),
        (dict(index_bits=2), "index_bits"),
        (dict(index_bits=32), "index_bits"),
        (dict(index_bits=8.0), "index_bits"),
        (dict(mode="quest"), "mode"),
        (dict(lagged_selection="yes"), "lagged_selection"),
        (dict(index_channel_metric="q*k"), "index_channel_metric"),
        (dict(group_score="mean"), "group_score"),
        (dict(index_basis="svd"), "index_basis"),
        (dict(block_bound_weight=-0.1), "block_bound_weight"),
        (dict(block_bound_weight=True), "block_bound_weight"),
        (dict(block_bound_weight=None), "block_bound_weight"),
        (dict(num_blocks=4, selection_block_size=64, token_budget=257), "token_budget"),
    ],
)
def test_config_rejects_bad_values(knobs, name):
    with pytest.raises(ValueError, match=name):
        SparseAttentionConfig(**knobs)


def test_config_defaults_and_cache_checks():
    config = SparseAttentionConfig()
    assert config.attended_tokens == 64 + 64 + 2048
    assert SparseAttentionConfig.for_mla().index_channels == 128
    assert SparseAttentionConfig(index_channels=7, index_bits=8).index_channels == 7
    config.validate_for_cache(128, 128)
    with pytest.raises(ValueError, match="--block-size"):
        config.validate_for_cache(96, 128)
    with pytest.raises(ValueError, match="index_channels"):
        SparseAttentionConfig(index_channels=64).validate_for_cache(64, 32)
    with pytest.raises(ValueError, match="--block-size"):
        ref.allocate_index(4, 16, 1, 32, config, torch.float32, "cpu")
    with pytest.raises(FrozenInstanceError):
        config.token_budget = 1


# ----------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_dequantize_error_bound(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 16, generator=gen) * torch.rand(50, 3, 1, generator=gen) * 5
    x[7, 1] = 0.0  # an all-zero key: zero scale, decodes to zero
    codes, scales = ref.quantize_index(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (50, 3, 16 * bits // 8)
    assert scales.dtype == torch.float32 and scales.shape == (50, 3)
    qmax = 2 ** (bits - 1) - 1
    torch.testing.assert_close(scales, x.abs().amax(-1) / qmax)
    back = ref.dequantize_index(codes, scales, bits, 16)
    assert back.shape == x.shape
    assert ((back - x).abs() <= scales.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all()
    assert (back[7, 1] == 0).all() and scales[7, 1] == 0
    # Stored values are q + qmax + 1, channel 2i in the low nibble for 4 bits.
    one = torch.tensor([[1.0, -1.0, 0.3, 0.0]])
    codes, _ = ref.quantize_index(one, bits)
    stored = [qmax + qmax + 1, -qmax + qmax + 1, round(0.3 * qmax) + qmax + 1, qmax + 1]
    if bits == 4:
        assert codes.tolist() == [[stored[0] | stored[1] << 4, stored[2] | stored[3] << 4]]
    else:
        assert codes.tolist() == [stored]


def adversarial_summaries(gen: torch.Generator, subnormal: bool = False, d: int = 24) -> tuple[Tensor, Tensor]:
    """Summary rows (min, max), each (R, d) float32 with min <= max, made to trip outward rounding:
    random keys over magnitudes 1e-30 .. 1e30 with mixed signs; values at, one float32 step beside and a
    fraction of TOL below / above `c * scale` products of the row's own scale (the extreme channel
    included); the extreme channel on the min side, the max side or both; negative zeros; all-zero,
    all-positive, all-negative and min == max rows; subnormal rows (keys and scales) with `subnormal`."""
    rows = []  # (min, max) pairs of (d,) float32
    for mag in (1e-30, 1e-6, 1.0, 1e3, 1e30):
        x = torch.randn(2, 4, d, generator=gen, dtype=torch.float64).mul(mag).float()  # (2, 4, d)
        rows += list(zip(x.amin(0), x.amax(0)))
    inf = torch.tensor(math.inf)
    short = torch.rand(4096, generator=gen) * 10  # amax values whose float32 amax / 127 * 127 falls short
    short = short[short / 127 * 127 < short][:3].tolist()
    assert len(short) == 3
    for amax in (1.0, 0.3, 3.7e-4, 2.5e3, 1e20, float(torch.rand(1, generator=gen)) * 40, *short):
        for side in (-1.0, 1.0):
            _, _, scale = ref.quantize_summary(torch.full((d,), -amax), torch.full((d,), amax))  # the row's scale
            c = torch.randint(-127, 128, (2, d), generator=gen).double()  # (2, d)
            lo = (c.amin(0) * scale).float()  # exactly at products: fl(c * scale)
            hi = (c.amax(0) * scale).float()
            frac = torch.tensor([1e-4, 5e-4, 9e-4, 0.0], dtype=torch.float64)[torch.randint(0, 4, (d,), generator=gen)]
            rows += [
                (lo, hi),
                (torch.nextafter(lo, -inf), torch.nextafter(hi, inf)),
                (torch.nextafter(lo, inf), torch.nextafter(hi, -inf)),
                ((c.amin(0) - frac) * scale.double(), (c.amax(0) + frac) * scale.double()),  # TOL's old misses
                ((c.amin(0) + frac) * scale.double(), (c.amax(0) - frac) * scale.double()),
            ]
            for r in range(len(rows) - 5, len(rows)):  # put the extreme channel on one side
                mn, mx = rows[r][0].float().clone(), rows[r][1].float().clone()
                mn, mx = torch.minimum(mn, mx), torch.maximum(mn, mx)
                if side < 0:
                    mn[3] = -amax
                else:
                    mx[3] = amax
                rows[r] = (mn.clamp(-amax, amax), mx.clamp(-amax, amax))
    z = torch.zeros(d)
    rows += [(z, z), (-z, -z), (-z, z), (torch.full((d,), 2.5), torch.full((d,), 2.5)),
             (torch.full((d,), -3.0), torch.full((d,), -3.0) + torch.rand(d, generator=gen))]
    mixed = torch.randn(d, generator=gen)
    mixed[::3] = -0.0
    rows += [(mixed, mixed.abs()), (-mixed.abs(), mixed),
             (torch.rand(d, generator=gen) + 1, torch.rand(d, generator=gen) + 2)]
    both = torch.rand(d, generator=gen)
    both[5] = 1.0
    rows.append((-both, both))  # the extreme channel on both sides
    if subnormal:
        for scale_to in (1e-40, 1e-44, 1e-38, 2e-36):
            x = (torch.randn(2, 3, d, generator=gen, dtype=torch.float64) * scale_to).float()  # (2, 3, d)
            rows += list(zip(x.amin(0), x.amax(0)))
        tiny = torch.zeros(d)
        tiny[0] = -torch.finfo(torch.float32).smallest_normal / 2**23  # the smallest subnormal: scale 0 first
        rows.append((tiny, z))
    mins = torch.stack([r[0].float() for r in rows])  # (R, d)
    maxs = torch.stack([r[1].float() for r in rows])
    assert (mins <= maxs).all()
    return mins, maxs


def assert_exact_summary(code_min: Tensor, code_max: Tensor, scale: Tensor, mins: Tensor, maxs: Tensor) -> None:
    """The codes bound (mins, maxs) (R, D) exactly, as `dequantize_summary` decodes them, and are the
    tightest codes that do: one more code inward (float32 `c * scale`) would miss."""
    assert code_min.dtype == code_max.dtype == torch.int8 and scale.dtype == torch.float32
    assert code_min.abs().max() <= 127 and code_max.abs().max() <= 127
    assert (ref.dequantize_summary(code_min, scale) <= mins).all()
    assert (ref.dequantize_summary(code_max, scale) >= maxs).all()
    amax = torch.maximum(mins.abs(), maxs.abs()).amax(-1)  # (R,)
    assert (scale * 127 >= amax).all()  # the extreme channel's +-127 reaches it
    assert ((scale == 0) == (amax == 0)).all()
    live = scale > 0
    inward_min = (code_min.float() + 1) * scale.unsqueeze(-1)  # (R, D)
    inward_max = (code_max.float() - 1) * scale.unsqueeze(-1)
    assert ((inward_min > mins) | (code_min == 127) | ~live.unsqueeze(-1)).all()
    assert ((inward_max < maxs) | (code_max == -127) | ~live.unsqueeze(-1)).all()
    assert (code_min[~live] == 0).all() and (code_max[~live] == 0).all()


def test_quantize_summary_bounds_exactly_and_requantises_to_itself():
    mins, maxs = adversarial_summaries(torch.Generator().manual_seed(0), subnormal=True)
    code_min, code_max, scale = ref.quantize_summary(mins, maxs)
    assert_exact_summary(code_min, code_max, scale, mins, maxs)
    # The old rule (TOL only, no correction) missed some of these rows: they test the correction.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    tol_only = torch.floor(mins / safe + ref.SUMMARY_TOL)
    assert (tol_only * scale.unsqueeze(-1) > mins).any()
    # Requantising what is stored gives it back (the decode path: a token inside the summary).
    back_min, back_max = ref.dequantize_summary(code_min, scale), ref.dequantize_summary(code_max, scale)
    again = ref.quantize_summary(back_min, back_max)
    assert torch.equal(again[2], scale)
    assert torch.equal(again[0], code_min) and torch.equal(again[1], code_max)
    # A token that widens channel 0 inside the row's reach (so the scale stays) moves only its code.
    reach = torch.maximum(back_min.abs(), back_max.abs()).amax(-1)  # (R,)
    wider = back_min.clone()
    wider[:, 0] = torch.maximum(2 * back_min[:, 0] - back_max[:, 0], -reach)
    moved = ref.quantize_summary(wider, back_max)
    assert torch.equal(moved[2], scale) and torch.equal(moved[0][:, 1:], code_min[:, 1:])
    assert torch.equal(moved[1], code_max)
    assert_exact_summary(*moved, wider, back_max)


def test_summary_scale_reaches_amax_and_requantises_to_itself_for_every_mantissa():
    # Every float32 in [1, 2) as a row's amax (on the max side; scaling by powers of two changes nothing
    # short of subnormals and overflow): 127 * scale reaches it, the code is 127, and the dequantised row
    # (amax' = 127 * scale) requantises to the same scale and code.
    amax = torch.arange(0x3F800000, 0x40000000, dtype=torch.int32).view(torch.float32).unsqueeze(-1)  # (N, 1)
    code_min, code_max, scale = ref.quantize_summary(-amax / 2, amax)
    assert (code_max == 127).all() and (scale * 127 >= amax.squeeze(-1)).all()
    back = ref.dequantize_summary(code_max, scale)
    again = ref.quantize_summary(ref.dequantize_summary(code_min, scale), back)
    assert torch.equal(again[2], scale) and torch.equal(again[1], code_max) and torch.equal(again[0], code_min)


def test_choose_index_channels_picks_heavy_channels():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 2, 32, generator=gen)
    keys[:, 0, [3, 17, 30]] *= 10
    keys[:, 1, [0, 5, 9]] *= -10  # sign does not matter
    chosen = ref.choose_index_channels(keys, 3)
    assert chosen.dtype == torch.int64
    assert chosen.tolist() == [[3, 17, 30], [0, 5, 9]]


def test_choose_index_channels_std_skips_constant_offsets_and_queries_weight():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(400, 2, 32, generator=gen)
    keys[:, :, [2, 11]] = 0.1 * keys[:, :, [2, 11]] + 8.0  # heavy but constant: cannot move the ranking
    keys[:, :, [5, 21]] *= 4  # spread: what moves the ranking
    assert set(ref.choose_index_channels(keys, 2)[0].tolist()) == {2, 11}  # mean_abs (default)
    assert ref.choose_index_channels(keys, 2, metric="std").tolist() == [[5, 21], [5, 21]]
    # Queries that ignore channel 21 of kv head 1 (q heads 2, 3 of a group of 2): 21 gives way there.
    queries = torch.ones(6, 4, 32)
    queries[:, 2:, 21] = 0.0
    chosen = ref.choose_index_channels(keys, 2, metric="std", queries=queries)
    assert chosen[0].tolist() == [5, 21] and 21 not in chosen[1].tolist() and 5 in chosen[1].tolist()
    with pytest.raises(ValueError, match="metric"):
        ref.choose_index_channels(keys, 2, metric="max")
    with pytest.raises(ValueError, match="queries"):
        ref.choose_index_channels(keys, 2, queries=torch.ones(6, 3, 32))  # 3 q heads over 2 kv heads


def test_std_channels_raise_recall_on_constant_offset_heavy_channels():
    # The benchmark's structure in small: constant-offset heavy channels (mean |k| picks them, they
    # add the same amount to every score) and signal spread over all channels. Choosing channels by
    # spread keeps more of the ranking, and the reference scores whatever channel ids it is given.
    gen = torch.Generator().manual_seed(0)
    Hkv, G, D, L = 2, 4, 128, 2048
    heavy = torch.tensor([3, 9, 17, 30, 44, 58])
    direction = torch.nn.functional.normalize(torch.randn(2, Hkv, D, generator=gen), dim=-1)
    query = direction.unsqueeze(2) * 3 + 0.5 * torch.randn(2, Hkv, G, D, generator=gen)
    query[..., heavy] += 1.0
    calls = iter(range(2))

    def keys_fn(length, g):
        b = next(calls)
        k = torch.randn(length, Hkv, D, generator=g)
        k[..., heavy] = 0.5 * k[..., heavy] + 16.0  # also sets the 4-bit per-token scale under mean_abs
        where = torch.randint(16, length - 16, (96,), generator=g)
        k[where] += (4 + 8 * torch.rand(96, 1, 1, generator=g)) * direction[b]
        return k

    case = build_case([L, L - 5], 16, Hkv, G, D, seed=0, keys_fn=keys_fn, query=query.reshape(2, Hkv * G, D))
    config = SparseAttentionConfig(selection_block_size=16, num_blocks=64, token_budget=128, sink_tokens=16,
                                   local_tokens=16, index_channels=32, index_bits=4)
    scale = D ** -0.5
    recalls = {}
    for metric in ("mean_abs", "std"):
        index = build_index(case, config, calibrate=False)
        ref.set_index_channels(index, ref.choose_index_channels(torch.cat(case.keys), 32, metric=metric))
        ref.write_index(index, case.flat_keys, case.slots, config)
        _, positions, _ = ref.sparse_decode(case.query, case.key_cache, case.value_cache, case.block_table,
                                            case.seq_lens, index, config, scale)
        recalls[metric] = ref.attention_mass_recall(case.query, case.key_cache, case.block_table, case.seq_lens,
                                                    positions, scale).mean().item()
    assert recalls["std"] > recalls["mean_abs"] + 0.01, recalls  # measured 0.348 vs 0.308


def summary_of(index, case, b, j, S):
    """Dequantised (min, max) (Hkv, D) and scale (Hkv,) of logical selection block j of sequence b."""
    cbs = case.key_cache.shape[1]
    physical = int(case.block_table[b, j * S // cbs])
    sub = (j * S % cbs) // S
    scale = index.block_scale[physical, sub]
    return (ref.dequantize_summary(index.block_min[physical, sub], scale),
            ref.dequantize_summary(index.block_max[physical, sub], scale), scale)


def calls_touching(chunks, case, b, members):
    """How many of the write calls (lists of flat indices into case.slots) hold a token of the block."""
    cbs = case.key_cache.shape[1]
    table = case.block_table[b].long()
    wanted = {int(table[p // cbs]) * cbs + p % cbs for p in members}
    return sum(any(int(case.slots[i]) in wanted for i in chunk) for chunk in chunks)


@pytest.mark.parametrize("name", ["c16s16-mha-exact", "c64s16-gqa4-4bit", "c64s64-gqa4-8bit", "c16s16-mla-4bit"])
def test_write_index_summaries_bound_keys_whatever_the_split(name):
    case, config = shape_case(name, long_blocks=3)  # shorter: one write_index call per token below
    prefill = build_index(case, config)
    n = case.slots.numel()
    # Token by token (decode), in order, from a junk-filled start.
    stepwise = build_index(case, config, calibrate=False)
    stepwise.channel_ids.copy_(prefill.channel_ids)
    fill_summaries_with_junk(stepwise, torch.Generator().manual_seed(2), scale_max=0.1)
    steps = [[i] for i in range(n)]
    for (i,) in steps:
        ref.write_index(stepwise, case.flat_keys[i : i + 1], case.slots[i : i + 1], config)
    # Prefill in uneven chunks that split selection blocks.
    chunked = build_index(case, config, calibrate=False)
    chunked.channel_ids.copy_(prefill.channel_ids)
    fill_summaries_with_junk(chunked, torch.Generator().manual_seed(3), scale_max=0.1)
    chunks = [list(range(lo, min(lo + 37, n))) for lo in range(0, n, 37)]
    for chunk in chunks:
        ref.write_index(chunked, case.flat_keys[chunk], case.slots[chunk], config)

    S = config.selection_block_size
    for index, calls in ((prefill, [list(range(n))]), (stepwise, steps), (chunked, chunks)):
        for b, k in enumerate(case.keys):
            L = k.shape[0]
            for j in range(math.ceil(L / S)):
                members = list(range(j * S, min((j + 1) * S, L)))
                true_min, true_max = k[members].min(dim=0).values, k[members].max(dim=0).values  # (Hkv, D)
                got_min, got_max, scale = summary_of(index, case, b, j, S)
                step = scale.unsqueeze(-1)  # (Hkv, 1): one code
                # Rounded outward: an exact bound of every key ...
                assert (got_min <= true_min).all() and (got_max >= true_max).all()
                # ... and loose by at most one code per call that re-rounded it (each growth of the scale),
                # up to float32 rounding.
                slack = 1e-6 * true_min.abs().clamp(min=1)
                n_calls = calls_touching(calls, case, b, members)
                assert 1 <= n_calls <= len(members)
                assert (got_min >= true_min - n_calls * step - slack).all()
                assert (got_max <= true_max + n_calls * step + slack).all()
                if index is prefill:  # one call: the exact min / max quantised once
                    want_min, want_max = brute_summary_heads(k[members])
                    assert torch.equal(got_min, want_min) and torch.equal(got_max, want_max)
        if config.index_bits != 16:  # token codes do not depend on the split
            assert torch.equal(index.codes, prefill.codes)
            assert torch.equal(index.scales, prefill.scales)
    if config.index_bits != 16:
        # Codes of a token decode back to its calibrated channels within scale / 2.
        cbs = case.key_cache.shape[1]
        b, p = 0, 17
        physical, offset = int(case.block_table[b, p // cbs]), p % cbs
        back = ref.dequantize_index(prefill.codes[physical, offset], prefill.scales[physical, offset],
                                    config.index_bits, config.index_channels)
        kc = case.keys[b][p].gather(-1, prefill.channel_ids)
        assert ((back - kc).abs() <= prefill.scales[physical, offset].unsqueeze(-1) / 2 + 1e-6).all()
    else:
        assert prefill.codes is None and prefill.scales is None


def brute_summary_heads(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`brute_summary` per kv head: keys (n, Hkv, D) -> dequantised (min, max) (Hkv, D)."""
    pairs = [brute_summary(keys[:, h]) for h in range(keys.shape[1])]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def test_write_index_decode_writes_inside_the_summary_do_not_drift():
    # A block written once, then tokens appended one call at a time whose keys lie strictly inside its
    # min / max: the scale does not grow, so requantising must give back the very same codes (a plain
    # floor / ceil would drift one code per call where float32 (c * s) / s lands beside c).
    S, hkv, d = 64, 2, 128
    config = SparseAttentionConfig(selection_block_size=S, num_blocks=4, token_budget=64, sink_tokens=0,
                                   local_tokens=0, index_channels=16, index_bits=4)
    index = ref.allocate_index(2, S, hkv, d, config, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(S // 2, hkv, d, generator=gen) * torch.rand(1, 1, d, generator=gen) * 5  # (S/2, Hkv, D)
    ref.write_index(index, first, torch.arange(S, S + S // 2), config)  # cache block 1, offsets 0 .. S/2-1
    codes = (index.block_min[1, 0].clone(), index.block_max[1, 0].clone())
    scale = index.block_scale[1, 0].clone()
    lo, hi = first.min(dim=0).values, first.max(dim=0).values
    for t in range(S // 2, S):
        inside = lo + (hi - lo) * torch.rand(hkv, d, generator=gen).clamp(0.05, 0.95)  # (Hkv, D)
        ref.write_index(index, inside.unsqueeze(0), torch.tensor([S + t]), config)
    assert torch.equal(index.block_scale[1, 0], scale)
    assert torch.equal(index.block_min[1, 0], codes[0]) and torch.equal(index.block_max[1, 0], codes[1])
    assert index.block_min.dtype == index.block_max.dtype == torch.int8


def test_write_index_all_zero_summary_stores_zero_scale_and_codes():
    config = SparseAttentionConfig(selection_block_size=16, num_blocks=2, token_budget=16, sink_tokens=0,
                                   local_tokens=0, index_channels=8, index_bits=16)
    index = ref.allocate_index(2, 16, 1, 32, config, torch.float32, "cpu")
    fill_summaries_with_junk(index, torch.Generator().manual_seed(0), scale_max=0.1)
    ref.write_index(index, torch.zeros(3, 1, 32), torch.tensor([16, 17, 18]), config)
    assert torch.equal(index.block_scale[1, 0], torch.zeros(1))
    assert not index.block_min[1, 0].any() and not index.block_max[1, 0].any()


def test_write_index_skips_padding_slots():
    case, config = shape_case("c64s16-gqa4-4bit")
    index = build_index(case, config)
    before = [t.clone() for t in (index.block_min, index.block_max, index.block_scale, index.codes, index.scales)]
    junk = torch.full((4, case.key_cache.shape[2], case.key_cache.shape[3]), 1e3)
    ref.write_index(index, junk, torch.tensor([-1, -1, -5, -1]), config)
    for old, new in zip(before, (index.block_min, index.block_max, index.block_scale, index.codes, index.scales)):
        assert torch.equal(old, new)


def test_sparse_attention_with_nothing_to_attend_gives_zeros():
    case, _ = shape_case("c64s16-gqa4-4bit")
    positions = torch.full((3, case.key_cache.shape[2], 7), -1, dtype=torch.int32)
    out = ref.sparse_attention(case.query, case.key_cache, case.value_cache, case.block_table, positions, 0.1)
    assert out.shape == (3, case.query.shape[1], case.value_cache.shape[-1])
    assert torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# Stages against brute force
# ----------------------------------------------------------------------------------------------


GROUP_RULES = [("lse", None), ("lse", 0.37), ("max", None)]  # (group_score, softmax_scale passed)


@pytest.mark.parametrize("group_score, softmax_scale", GROUP_RULES)
@pytest.mark.parametrize("name", list(SHAPES))
def test_block_stage_matches_brute_force(name, group_score, softmax_scale):
    case, config = shape_case(name, group_score=group_score)
    index = build_index(case, config)
    scores = ref.score_blocks(case.query, index, case.block_table, case.seq_lens, config, softmax_scale)
    cbs, S = case.key_cache.shape[1], config.selection_block_size
    assert scores.shape == (3, case.key_cache.shape[2], case.block_table.shape[1] * cbs // S)
    assert scores.dtype == torch.float32
    selected = ref.select_blocks(case.query, index, case.block_table, case.seq_lens, config, softmax_scale)
    assert selected.shape == (3, case.key_cache.shape[2], config.num_blocks) and selected.dtype == torch.int32
    for (b, h), want in brute_block_scores(case, config, softmax_scale).items():
        got = {j: float(s) for j, s in enumerate(scores[b, h]) if s > float("-inf")}
        assert set(got) == set(want)
        for j in want:
            assert got[j] == pytest.approx(want[j], rel=1e-5, abs=1e-4)
        assert_topk_set(ids(selected[b, h]), want, config.num_blocks)


@pytest.mark.parametrize("weight", [0.5, 0.0])
@pytest.mark.parametrize("name", ["c64s16-gqa4-4bit", "c16s16-mla-4bit"])
def test_block_stage_with_bound_weight_matches_brute_force(name, weight):
    # w * bound + (1 - w) * q . (min + max) / 2 per head, then the group rule; w = 0 is the midpoint.
    case, config = shape_case(name, block_bound_weight=weight)
    index = build_index(case, config)
    scores = ref.score_blocks(case.query, index, case.block_table, case.seq_lens, config)
    selected = ref.select_blocks(case.query, index, case.block_table, case.seq_lens, config)
    bound_only = ref.score_blocks(case.query, index, case.block_table, case.seq_lens, config.with_(block_bound_weight=1.0))
    finite = torch.isfinite(bound_only)
    assert torch.equal(finite, torch.isfinite(scores)) and (scores[finite] <= bound_only[finite] + 1e-4).all()
    assert not torch.allclose(scores[finite], bound_only[finite])
    for (b, h), want in brute_block_scores(case, config).items():
        got = {j: float(s) for j, s in enumerate(scores[b, h]) if s > float("-inf")}
        assert set(got) == set(want)
        for j in want:
            assert got[j] == pytest.approx(want[j], rel=1e-5, abs=1e-4)
        assert_topk_set(ids(selected[b, h]), want, config.num_blocks)


@pytest.mark.parametrize("group_score, softmax_scale", GROUP_RULES)
@pytest.mark.parametrize("name", list(SHAPES))
def test_token_stage_matches_brute_force(name, group_score, softmax_scale):
    case, config = shape_case(name, group_score=group_score)
    index = build_index(case, config)
    blocks = ref.select_blocks(case.query, index, case.block_table, case.seq_lens, config, softmax_scale)
    positions, scores = ref.score_tokens(case.query, index, case.key_cache, case.block_table, case.seq_lens,
                                         blocks, config, softmax_scale)
    S = config.selection_block_size
    assert positions.shape == scores.shape == (3, case.key_cache.shape[2], config.num_blocks * S)
    selected = ref.select_tokens(case.query, index, case.key_cache, case.block_table, case.seq_lens, blocks, config,
                                 softmax_scale)
    assert selected.shape == (3, case.key_cache.shape[2], config.token_budget) and selected.dtype == torch.int32
    for b, k in enumerate(case.keys):
        L = k.shape[0]
        for h in range(k.shape[1]):
            want = {
                p: brute_token_score(case, config, index.channel_ids, b, h, p, softmax_scale)
                for j in ids(blocks[b, h])
                for p in range(j * S, min((j + 1) * S, L))
                if is_candidate(p, L, config)
            }
            got = {int(p): float(s) for p, s in zip(positions[b, h], scores[b, h]) if s > float("-inf")}
            assert set(got) == set(want)
            for p in want:
                assert got[p] == pytest.approx(want[p], rel=1e-5, abs=1e-4)
            assert_topk_set(ids(selected[b, h]), want, config.token_budget)


@pytest.mark.parametrize("name", ["c64s16-gqa4-4bit", "c16s16-mla-4bit"])
def test_neighbours_match_brute_force(name):
    case, config = shape_case(name)
    index = build_index(case, config)
    S = config.selection_block_size
    exact = ref.exact_topk_positions(case.query, case.key_cache, case.block_table, case.seq_lens, config)
    quest = ref.block_only_positions(case.query, index, case.block_table, case.seq_lens, config)
    assert exact.shape == quest.shape == (3, case.key_cache.shape[2], config.attended_tokens)
    exact_cfg = config.with_(index_bits=16)
    blocks = brute_block_scores(case, config)
    for b, k in enumerate(case.keys):
        L = k.shape[0]
        always = {p for p in range(L) if not is_candidate(p, L, config)}
        for h in range(k.shape[1]):
            scored = {p: brute_token_score(case, exact_cfg, None, b, h, p) for p in range(L) if is_candidate(p, L, config)}
            got = ids(exact[b, h])
            assert always <= got
            assert_topk_set(got - always, scored, config.token_budget)
            got = ids(quest[b, h])
            assert always <= got
            kept = sorted(blocks[b, h].items(), key=lambda kv: -kv[1])[: config.token_budget // S]
            want = {p for j, _ in kept for p in range(j * S, min((j + 1) * S, L)) if is_candidate(p, L, config)}
            assert got - always == want


@pytest.mark.parametrize("group_score", ["lse", "max"])
def test_group_block_bound_bounds_every_token_group_score(group_score):
    # Combining the heads keeps the coarse level sound: a block's combined bound is >= the combined
    # exact score of every candidate in it, whatever the rule.
    case, config = shape_case("c64s16-gqa4-4bit", group_score=group_score, index_bits=16)
    index = build_index(case, config)
    scale = 0.2
    bounds = ref.score_blocks(case.query, index, case.block_table, case.seq_lens, config, scale)  # (B, Hkv, NS)
    S = config.selection_block_size
    every = torch.arange(bounds.shape[-1], dtype=torch.int32).expand(*bounds.shape[:2], -1).contiguous()
    positions, scores = ref.score_tokens(case.query, index, case.key_cache, case.block_table, case.seq_lens,
                                         every, config, scale)  # (B, Hkv, NS * S)
    finite = torch.isfinite(scores)
    assert finite.any()
    block_of = (positions.long().clamp(min=0) // S)
    assert (scores[finite] <= bounds.gather(-1, block_of)[finite] + 1e-4).all()


def test_lse_group_score_lies_between_max_and_max_plus_log_group():
    # lse = max + log(sum_h exp(t (s_h - max))) / t, in [max, max + log(G) / t]; for G = 1 it is the max.
    case, config = shape_case("c64s16-gqa4-4bit", index_bits=16)
    index = build_index(case, config)
    blocks = ref.select_blocks(case.query, index, case.block_table, case.seq_lens, config.with_(group_score="max"))
    t, G = 0.5, case.group
    _, lse = ref.score_tokens(case.query, index, case.key_cache, case.block_table, case.seq_lens, blocks, config, t)
    _, top = ref.score_tokens(case.query, index, case.key_cache, case.block_table, case.seq_lens, blocks,
                              config.with_(group_score="max"), t)
    finite = torch.isfinite(top)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] >= top[finite] - 1e-5).all() and (lse[finite] <= top[finite] + math.log(G) / t + 1e-5).all()
    assert (lse[finite] > top[finite] + 1e-3).any()  # the other heads count
    mha, mha_config = shape_case("c64s16-hkv4-4bit", index_bits=16)
    mha_index = build_index(mha, mha_config)
    a = ref.score_blocks(mha.query, mha_index, mha.block_table, mha.seq_lens, mha_config, t)
    b = ref.score_blocks(mha.query, mha_index, mha.block_table, mha.seq_lens, mha_config.with_(group_score="max"), t)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="softmax_scale"):
        ref.score_blocks(mha.query, mha_index, mha.block_table, mha.seq_lens, mha_config, -1.0)


def test_attended_positions_layout():
    config = SparseAttentionConfig(selection_block_size=4, num_blocks=2, token_budget=3, sink_tokens=4, local_tokens=3)
    selected = torch.tensor([[[5, -1, 9]], [[2, 4, -1]], [[-1, -1, -1]]], dtype=torch.int32)
    seq_lens = torch.tensor([20, 6, 2], dtype=torch.int32)
    got = ref.attended_positions(selected, seq_lens, config)
    assert got.shape == (3, 1, config.attended_tokens) and got.dtype == torch.int32
    assert got[0, 0].tolist() == [0, 1, 2, 3, 17, 18, 19, 5, -1, 9]
    # L=6: local window [3, 6) overlaps the sinks [0, 4): 3 appears once; selections there are dropped.
    assert got[1, 0].tolist() == [0, 1, 2, 3, -1, 4, 5, -1, -1, -1]
    assert got[2, 0].tolist() == [0, 1, -1, -1, -1, -1, -1, -1, -1, -1]


# ----------------------------------------------------------------------------------------------
# Outputs against dense
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["asynctls", "block_only", "exact_topk", "dense", "asynctls_midpoint_blocks"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_full_budget_equals_dense(name, mode):
    case, config = shape_case(name)
    if mode == "asynctls_midpoint_blocks":
        mode, config = "asynctls", config.with_(block_bound_weight=0.0)
    S = config.selection_block_size
    covering = math.ceil(int(case.seq_lens.max()) / S)
    config = config.with_(mode=mode, num_blocks=covering, token_budget=covering * S)
    index = build_index(case, config)
    scale = case.query.shape[-1] ** -0.5
    dense = ref.dense_decode_attention(case.query, case.key_cache, case.value_cache, case.block_table,
                                       case.seq_lens, scale)
    every = {(b, h): set(range(len(k))) for b, k in enumerate(case.keys) for h in range(k.shape[1])}
    torch.testing.assert_close(dense, masked_dense(case, every, scale), atol=1e-5, rtol=1e-5)
    out, positions, _ = ref.sparse_decode(case.query, case.key_cache, case.value_cache, case.block_table,
                                          case.seq_lens, index, config, scale)
    assert out.shape == dense.shape and out.dtype == case.query.dtype
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    for (b, h), want in every.items():
        assert ids(positions[b, h]) == want
    recall = ref.attention_mass_recall(case.query, case.key_cache, case.block_table, case.seq_lens, positions, scale)
    torch.testing.assert_close(recall, torch.ones_like(recall))


@pytest.mark.parametrize("name", ["c64s16-gqa4-4bit", "c64s64-gqa4-8bit", "c16s16-mla-4bit", "c16s16-mha-exact"])
def test_budget_covering_kept_blocks_equals_attention_over_them(name):
    case, config = shape_case(name)
    config = config.with_(token_budget=config.num_blocks * config.selection_block_size)
    index = build_index(case, config)
    scale = 0.3
    out, positions, block_ids = ref.sparse_decode(case.query, case.key_cache, case.value_cache, case.block_table,
                                                  case.seq_lens, index, config, scale)
    S = config.selection_block_size
    attended = {}
    for b, k in enumerate(case.keys):
        L = k.shape[0]
        for h in range(k.shape[1]):
            kept = ids(block_ids[b, h])
            attended[b, h] = {p for p in range(L) if not is_candidate(p, L, config) or p // S in kept}
            assert ids(positions[b, h]) == attended[b, h]
    torch.testing.assert_close(out, masked_dense(case, attended, scale), atol=1e-5, rtol=1e-5)


def planted_case(seed=0, group=1, num_kv_heads=2, head_dim=64, L=1024, planted=16):
    """Keys with a few heavy channels and `planted` tokens aligned with q, one per distinct block."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(2, num_kv_heads * group, head_dim, generator=gen) * 0.3
    heavy = torch.tensor([1, 7, 20, 33, 50, 61])
    query[..., heavy] += 3 * torch.sign(torch.randn(2, num_kv_heads * group, len(heavy), generator=gen))
    direction = query.view(2, num_kv_heads, group, head_dim).mean(2)  # (B, Hkv, D)
    calls = iter(range(2))

    def keys_fn(length, g):
        b = next(calls)
        k = torch.randn(length, num_kv_heads, head_dim, generator=g)
        k[..., heavy] *= 3
        blocks = torch.randperm(length // 16 - 8, generator=g)[:planted] + 4  # away from sinks / local
        where = blocks * 16 + torch.randint(0, 16, (planted,), generator=g)
        k[where] = 1.5 * direction[b] + 0.3 * torch.randn(planted, num_kv_heads, head_dim, generator=g)
        return k

    return build_case([L, L - 7], 16, num_kv_heads, group, head_dim, seed=seed, keys_fn=keys_fn, query=query)


@pytest.mark.parametrize("group", [1, 4])
def test_recall_ordering_on_planted_structure(group):
    case = planted_case(group=group)
    config = SparseAttentionConfig(selection_block_size=16, num_blocks=24, token_budget=64, sink_tokens=16,
                                   local_tokens=16, index_channels=16, index_bits=4)
    index = build_index(case, config)
    scale = case.query.shape[-1] ** -0.5
    recalls = {}
    for mode in ("exact_topk", "asynctls", "block_only"):
        _, positions, _ = ref.sparse_decode(case.query, case.key_cache, case.value_cache, case.block_table,
                                            case.seq_lens, index, config.with_(mode=mode), scale)
        recalls[mode] = ref.attention_mass_recall(case.query, case.key_cache, case.block_table, case.seq_lens,
                                                  positions, scale).mean().item()
    assert recalls["exact_topk"] >= recalls["asynctls"] >= recalls["block_only"], recalls
    assert recalls["asynctls"] > recalls["block_only"] + 0.05, recalls  # the gap the method exists for
    # The mass-optimal selection bounds every selection of the budget, the exact oracle under either rule.
    best = ref.mass_optimal_positions(case.query, case.key_cache, case.block_table, case.seq_lens, config, scale)
    assert best.shape == positions.shape
    bound = ref.attention_mass_recall(case.query, case.key_cache, case.block_table, case.seq_lens, best, scale)
    for rule in ("lse", "max"):
        _, exact, _ = ref.sparse_decode(case.query, case.key_cache, case.value_cache, case.block_table,
                                        case.seq_lens, index, config.with_(mode="exact_topk", group_score=rule), scale)
        got = ref.attention_mass_recall(case.query, case.key_cache, case.block_table, case.seq_lens, exact, scale)
        assert (bound >= got - 1e-6).all(), rule


def test_lagged_selection_uses_previous_blocks():
    # Two decode steps whose queries favour different blocks: with lagging, step 2 picks tokens in
    # the blocks step 1 chose.
    gen = torch.Generator().manual_seed(3)
    D, S, L = 16, 16, 256
    config = SparseAttentionConfig(selection_block_size=S, num_blocks=2, token_budget=16, sink_tokens=0,
                                   local_tokens=0, index_bits=16, index_channels=8, lagged_selection=True)
    keys = torch.randn(L, 1, D, generator=gen) * 0.1
    e1, e2 = torch.zeros(D), torch.zeros(D)
    e1[0], e2[1] = 1.0, 1.0
    keys[[20, 40], 0] += 5 * e1  # blocks 1 and 2 answer q1
    keys[[150, 200], 0] += 5 * e2  # blocks 9 and 12 answer q2
    case = build_case([L], S, 1, 1, D, keys_fn=lambda n, g: keys, query=(4 * e1).view(1, 1, D))
    index = build_index(case, config, calibrate=False)
    args = (case.key_cache, case.value_cache, case.block_table, case.seq_lens, index, config, 0.25)
    q1, q2 = (4 * e1).view(1, 1, D), (4 * e2).view(1, 1, D)

    _, pos1, blocks1 = ref.sparse_decode(q1, *args)
    assert ids(blocks1[0, 0]) == {1, 2}
    plain = ref.sparse_decode(q1, *args[:-2], config.with_(lagged_selection=False), 0.25)
    torch.testing.assert_close(plain[1], pos1)  # no previous blocks: the current ones

    out2, pos2, blocks2 = ref.sparse_decode(q2, *args, previous_block_ids=blocks1)
    assert ids(blocks2[0, 0]) == {9, 12}  # this step's choice, for the next step
    assert {p // S for p in ids(pos2[0, 0])} <= {1, 2}
    out_now, pos_now, _ = ref.sparse_decode(q2, *args[:-2], config.with_(lagged_selection=False), 0.25,
                                            previous_block_ids=blocks1)
    assert {150, 200} <= ids(pos_now[0, 0]) and not {150, 200} & ids(pos2[0, 0])
    assert not torch.allclose(out2, out_now)


# ----------------------------------------------------------------------------------------------
# Index basis ("pca": summaries and codes in each kv head's principal directions)
# ----------------------------------------------------------------------------------------------


def test_choose_index_basis_is_orthonormal_and_ordered_by_second_moment():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 2, 16, generator=gen) * torch.linspace(0.2, 3.0, 16)  # (N, Hkv, D)
    keys[:, 1] += 2.0 * torch.randn(16, generator=gen)  # a constant offset: the leading direction of head 1
    basis = ref.choose_index_basis(keys)
    assert basis.shape == (2, 16, 16) and basis.dtype == torch.float32
    torch.testing.assert_close(basis @ basis.transpose(1, 2), torch.eye(16).expand(2, -1, -1), atol=1e-5, rtol=0)
    moments = torch.einsum("hed,nhd->nhe", basis, keys).square().mean(0)  # (Hkv, D)
    assert (moments[:, :-1] >= moments[:, 1:] - 1e-4).all()
    offset = keys[:, 1].mean(0)
    assert torch.nn.functional.cosine_similarity(basis[1, 0], offset, dim=0).abs() > 0.9
    assert (basis.gather(-1, basis.abs().argmax(-1, keepdim=True)) > 0).all()  # signs fixed
    torch.testing.assert_close(ref.choose_index_basis(keys), basis, atol=0, rtol=0)
    with pytest.raises(ValueError, match="keys must be"):
        ref.choose_index_basis(keys[:0])


def test_identity_basis_selects_as_the_leading_channels():
    # With the identity as basis, the index is the channels one with channel ids 0..C-1.
    case, config = shape_case("c64s16-gqa4-4bit")
    d, hkv = case.key_cache.shape[3], case.key_cache.shape[2]
    plain = build_index(case, config, calibrate=False)
    ref.set_index_channels(plain, torch.arange(config.index_channels).expand(hkv, -1).contiguous())
    ref.write_index(plain, case.flat_keys, case.slots, config)
    rotated = build_index(case, config, calibrate=False)
    ref.set_index_basis(rotated, torch.eye(d).expand(hkv, -1, -1))
    assert torch.equal(rotated.channel_ids, plain.channel_ids)
    ref.write_index(rotated, case.flat_keys, case.slots, config)
    for name in ("block_min", "block_max", "block_scale", "codes", "scales"):
        assert torch.equal(getattr(rotated, name), getattr(plain, name)), name
    args = (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens)
    got, want = ref.sparse_decode(*args, rotated, config, 0.3), ref.sparse_decode(*args, plain, config, 0.3)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["c64s16-gqa4-4bit", "c64s64-gqa4-8bit", "c16s16-mla-4bit", "c16s16-mha-exact"])
def test_pca_basis_full_budget_equals_dense_and_bounds_hold(name):
    case, config = shape_case(name, index_basis="pca")
    S = config.selection_block_size
    covering = math.ceil(int(case.seq_lens.max()) / S)
    full = config.with_(num_blocks=covering, token_budget=covering * S)
    index = build_index(case, full)
    assert index.basis is not None
    scale = case.query.shape[-1] ** -0.5
    dense = ref.dense_decode_attention(case.query, case.key_cache, case.value_cache, case.block_table,
                                       case.seq_lens, scale)
    out, _, _ = ref.sparse_decode(case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens,
                                  index, full, scale)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    # The summaries bound the rotated keys, so each block's bound still bounds every candidate's exact
    # group score (q . k is the same in either coordinates, up to float32 rounding).
    exact = full.with_(index_bits=16, group_score="max")
    bounds = ref.score_blocks(case.query, index, case.block_table, case.seq_lens, exact, scale)
    every = torch.arange(bounds.shape[-1], dtype=torch.int32).expand(*bounds.shape[:2], -1).contiguous()
    positions, scores = ref.score_tokens(case.query, index, case.key_cache, case.block_table, case.seq_lens,
                                         every, exact, scale)
    finite = torch.isfinite(scores)
    assert finite.any()
    assert (scores[finite] <= bounds.gather(-1, positions.long().clamp(min=0) // S)[finite] + 1e-4).all()


def test_pca_basis_raises_recall_on_planted_directions():
    # Planted tokens along each sequence's query direction, which no single key channel carries: the
    # leading principal directions of the keys do, so the token index scores them nearly exactly.
    gen = torch.Generator().manual_seed(0)
    D, Hkv, G, L = 64, 2, 4, 2048
    direction = torch.nn.functional.normalize(torch.randn(Hkv, D, generator=gen), dim=-1)
    query = (direction.unsqueeze(1) * 3 + 0.5 * torch.randn(Hkv, G, D, generator=gen)).reshape(1, Hkv * G, D)

    def keys_fn(length, g):
        k = torch.randn(length, Hkv, D, generator=g)
        where = torch.randint(64, length - 64, (96,), generator=g)
        k[where] += (3 + 6 * torch.rand(96, Hkv, 1, generator=g)) * direction
        return k

    case = build_case([L], 64, Hkv, G, D, seed=1, keys_fn=keys_fn, query=query)
    base = SparseAttentionConfig(selection_block_size=16, num_blocks=64, token_budget=128, sink_tokens=16,
                                 local_tokens=16, index_channels=8, index_bits=4)
    scale = D ** -0.5
    recall = {}
    for basis in ("channels", "pca"):
        config = base.with_(index_basis=basis)
        index = build_index(case, config)
        for mode in ("asynctls", "exact_topk"):
            _, positions, _ = ref.sparse_decode(case.query, case.key_cache, case.value_cache, case.block_table,
                                                case.seq_lens, index, config.with_(mode=mode), scale)
            recall[basis, mode] = ref.attention_mass_recall(case.query, case.key_cache, case.block_table,
                                                            case.seq_lens, positions, scale).mean().item()
    exact = recall["channels", "exact_topk"]
    # Measured: channels 0.898 of exact top-k's mass, pca 0.976.
    assert recall["pca", "asynctls"] / exact > recall["channels", "asynctls"] / exact + 0.05, recall
    assert recall["pca", "asynctls"] / exact > 0.95, recall


def test_set_index_basis_checks_its_shape():
    case, config = shape_case("c64s16-gqa4-4bit")
    index = build_index(case, config, calibrate=False)
    with pytest.raises(ValueError, match="basis must have shape"):
        ref.set_index_basis(index, torch.eye(8).expand(2, -1, -1))


def test_pca_index_holds_its_basis_from_allocation_and_calibrates_in_place():
    # A CUDA graph captured before calibration (vLLM captures at start-up) must read the calibrated
    # basis: allocate_index makes the identity for index_basis="pca", set_index_basis overwrites it.
    case, config = shape_case("c64s16-gqa4-4bit", index_basis="pca")
    ncb, cbs, hkv, d = case.key_cache.shape
    index = ref.allocate_index(ncb, cbs, hkv, d, config, torch.float32, "cpu")
    assert torch.equal(index.basis, torch.eye(d).expand(hkv, -1, -1))
    storage = index.basis.data_ptr()
    basis = ref.choose_index_basis(torch.cat(case.keys))
    ref.set_index_basis(index, basis)
    assert index.basis.data_ptr() == storage and torch.equal(index.basis, basis)
    with pytest.raises(ValueError, match="holds a basis"):
        ref.set_index_channels(index, index.channel_ids.clone())
    channels = config.with_(index_basis="channels")
    assert ref.allocate_index(ncb, cbs, hkv, d, channels, torch.float32, "cpu").basis is None
