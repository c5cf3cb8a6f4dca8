"""TIP selection rules against independent plain-PyTorch / numpy computations written here.

The references below are deliberately written differently from `trl_tip.selection` (Python loops per rollout,
numpy quantiles, exact decimal budgets, enumerated inclusion probabilities) so a shared mistake is unlikely.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from trl_tip import (
    SELECTION_RULES,
    TIPConfig,
    TIPGKDConfig,
    chunked_token_statistics,
    select_tokens,
    selection_counts,
    token_statistics,
    token_types,
)


# ---- independent references ------------------------------------------------------------------------------------
def ref_budget(ratio: float, m: int) -> int:
    return 0 if m == 0 else max(1, math.floor(Fraction(str(ratio)) * m))


def ref_stats(student_logits, teacher_logits, mask):
    s = student_logits.double()
    t = teacher_logits.double()
    ps = torch.softmax(s, -1)
    pt = torch.softmax(t, -1)
    entropy = -(ps * torch.log(ps)).sum(-1) / math.log(s.shape[-1])
    rkl = (ps * (torch.log(ps) - torch.log(pt))).sum(-1)
    fkl = (pt * (torch.log(pt) - torch.log(ps))).sum(-1)
    m = mask.bool()
    return entropy * m, rkl * m, fkl * m


def ref_minmax(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return np.zeros_like(values) if high == low else (values - low) / (high - low)


def ref_select(rule, ratio, h, rkl, fkl, mask):
    """Per-rollout Python loop; ties broken by the earlier position."""
    h, rkl, fkl, mask = (x.double().numpy() for x in (h, rkl, fkl, mask))
    valid = mask > 0
    out = np.zeros_like(valid)
    if rule in ("type_aware", "q3"):
        cap = np.percentile(h[valid], 98) if valid.any() else 0.0
        h_hat = np.zeros_like(h)
        h_hat[valid] = ref_minmax(np.minimum(h[valid], cap))
        d_hat = np.zeros_like(h)
        d_hat[valid] = ref_minmax(rkl[valid])
    for b in range(h.shape[0]):
        positions = [t for t in range(h.shape[1]) if valid[b, t]]
        k = len(positions) if rule == "all" else ref_budget(ratio, len(positions))
        if rule == "all":
            score = {t: 0.0 for t in positions}
        elif rule == "type_aware":
            score = {t: 1 - (1 - h_hat[b, t]) * (1 - d_hat[b, t]) for t in positions}
        elif rule == "q3":
            score = {t: fkl[b, t] * (1 - h_hat[b, t]) for t in positions}
        elif rule == "divergence":
            score = {t: rkl[b, t] for t in positions}
        ranked = sorted(positions, key=lambda t: (-score[t], t))
        for t in ranked[:k]:
            out[b, t] = True
    return torch.from_numpy(out)


def make_batch(seed=0, batch=5, length=13, dtype=torch.float32):
    """Statistics with padding, an empty rollout, a one-token rollout and a rollout of ties."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(batch, length, generator=g, dtype=torch.float64).to(dtype)
    rkl = torch.rand(batch, length, generator=g, dtype=torch.float64).mul(3).to(dtype)
    fkl = torch.rand(batch, length, generator=g, dtype=torch.float64).mul(3).to(dtype)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 9:] = False  # right padding
    mask[2, :4] = False  # prompt / tool positions
    mask[3] = False  # nothing to train on
    mask[4, 1:] = False  # a single token
    h[0, 3] = h[0, 7] = h[0].max()  # exact ties at the top
    return h, rkl, fkl, mask


# ---- statistics ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-5)])
def test_token_statistics_matches_reference_in_fp32(dtype, tol):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(3, 7, 37, generator=g) * 3).to(dtype)
    t = (torch.randn(3, 7, 37, generator=g) * 3).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2] = 0
    stats = token_statistics(s, t, mask)
    ref = ref_stats(s, t, mask)  # from the same (rounded) inputs, in float64
    for got, want in zip(stats, ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol)
        assert (got[mask == 0] == 0).all()
    assert (stats.entropy >= 0).all() and (stats.entropy <= 1 + 1e-6).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)])
def test_chunked_statistics_match_full_logits(dtype, tol):
    g = torch.Generator().manual_seed(2)
    n, hs, ht, vocab = 11, 16, 24, 53
    h_s = torch.randn(n, hs, generator=g).to(dtype)
    h_t = torch.randn(n, ht, generator=g).to(dtype)
    w_s = (torch.randn(vocab, hs, generator=g) * 0.5).to(dtype)
    w_t = (torch.randn(vocab, ht, generator=g) * 0.5).to(dtype)
    b_s = torch.randn(vocab, generator=g).to(dtype)
    stats = chunked_token_statistics(h_s, w_s, b_s, h_t, w_t, None)
    ref = token_statistics(h_s.float() @ w_s.float().T + b_s.float(), h_t.float() @ w_t.float().T, torch.ones(n))
    torch.testing.assert_close(stats.entropy / math.log(vocab), ref.entropy, atol=tol, rtol=tol)
    torch.testing.assert_close(stats.reverse_kl, ref.reverse_kl, atol=tol, rtol=tol)
    torch.testing.assert_close(stats.forward_kl, ref.forward_kl, atol=tol, rtol=tol)


# ---- token types ---------------------------------------------------------------------------------------------------
def test_token_types_default_to_batch_medians():
    h, rkl, _, mask = make_batch()
    types = token_types(h, rkl, mask)
    valid = mask.numpy()
    h_med = np.median(h.numpy()[valid])
    d_med = np.median(rkl.numpy()[valid])
    for b, t in itertools.product(range(h.shape[0]), range(h.shape[1])):
        if not valid[b, t]:
            assert types[b, t] == 0
            continue
        high_h, high_d = h[b, t].item() > h_med, rkl[b, t].item() > d_med
        want = {(True, True): 1, (True, False): 2, (False, True): 3, (False, False): 4}[(high_h, high_d)]
        assert types[b, t] == want, (b, t)


def test_token_types_fixed_thresholds():
    h = torch.tensor([[0.9, 0.9, 0.1, 0.1, 0.5]])
    d = torch.tensor([[2.0, 0.1, 2.0, 0.1, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert token_types(h, d, mask, entropy_threshold=0.5, divergence_threshold=1.0).tolist() == [[1, 2, 3, 4, 0]]


# ---- budgets and deterministic rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.29, 0.3, 0.5, 0.57, 0.7, 0.99, 1.0])
def test_selection_counts_match_exact_budget(ratio):
    lengths = list(range(0, 130))
    mask = torch.zeros(len(lengths), 130, dtype=torch.bool)
    for b, m in enumerate(lengths):
        mask[b, :m] = True
    got = selection_counts(mask, ratio, "entropy").tolist()
    assert got == [ref_budget(ratio, m) for m in lengths]
    assert selection_counts(mask, ratio, "all").tolist() == lengths


@pytest.mark.parametrize("rule", ["all", "type_aware", "q3", "divergence"])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_deterministic_rules_match_reference(rule, ratio, seed):
    h, rkl, fkl, mask = make_batch(seed, dtype=torch.float64)
    got = select_tokens(rule, ratio, h, rkl, fkl, mask)
    assert got.dtype == torch.bool
    assert torch.equal(got, ref_select(rule, ratio, h, rkl, fkl, mask))
    assert not (got & ~mask).any()


def test_type_aware_caps_entropy_at_98th_percentile():
    # One huge entropy would squash everyone else's h^ to ~0 without the cap, and rollout 1 would keep position 0
    # (the only divergence there); with the cap its high-entropy positions score 1 and win.
    length = 100
    h = torch.linspace(0.0, 0.5, 2 * length, dtype=torch.float64).reshape(2, length)
    h[0, 0] = 1000.0
    d = torch.zeros(2, length, dtype=torch.float64)
    d[1, 0] = 0.3
    d[0, 1] = 1.0  # sets the divergence scale
    mask = torch.ones(2, length, dtype=torch.bool)
    got = select_tokens("type_aware", 0.01, h, d, d, mask)
    assert torch.equal(got, ref_select("type_aware", 0.01, h, d, d, mask))
    # Rollout 1 keeps one token: a capped high-entropy one (they tie at score 1; the earliest wins), not position 0.
    assert got[1].sum() == 1 and got[1].nonzero().item() > 90


def test_bf16_statistics_select_like_their_fp32_values():
    h, rkl, fkl, mask = make_batch(3)
    h16, r16, f16 = (x.bfloat16() for x in (h, rkl, fkl))
    for rule in ("type_aware", "q3", "divergence"):
        got = select_tokens(rule, 0.5, h16, r16, f16, mask)
        assert torch.equal(got, ref_select(rule, 0.5, h16.float(), r16.float(), f16.float(), mask))


def test_all_masked_selects_nothing():
    h, rkl, fkl, _ = make_batch()
    mask = torch.zeros_like(h, dtype=torch.bool)
    for rule in SELECTION_RULES:
        assert not select_tokens(rule, 0.5, h, rkl, fkl, mask, torch.Generator().manual_seed(0)).any()


# ---- sampling rules ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["entropy", "random"])
def test_sampling_rules_counts_support_and_seeding(rule):
    h, rkl, fkl, mask = make_batch()
    counts = [ref_budget(0.5, int(m)) for m in mask.sum(1)]
    draws = [select_tokens(rule, 0.5, h, rkl, fkl, mask, torch.Generator().manual_seed(s)) for s in range(20)]
    for got in draws:
        assert got.sum(1).tolist() == counts
        assert not (got & ~mask).any()
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1  # it is random...
    again = select_tokens(rule, 0.5, h, rkl, fkl, mask, torch.Generator().manual_seed(7))
    assert torch.equal(again, draws[7])  # ...and reproducible from the generator


def inclusion_probabilities(weights: list[float], k: int) -> list[float]:
    """Exact P(position selected) for k successive draws without replacement, probability proportional to weight."""
    n = len(weights)
    prob = [0.0] * n
    for sequence in itertools.permutations(range(n), k):
        p, remaining = 1.0, sum(weights)
        for t in sequence:
            p *= weights[t] / remaining
            remaining -= weights[t]
        for t in sequence:
            prob[t] += p
    return prob


def test_entropy_sampling_frequencies_match_weighted_draws_without_replacement():
    weights = [0.05, 0.4, 0.1, 0.8, 0.25, 0.6]
    draws = 6000
    h = torch.tensor(weights).repeat(draws, 1)  # one rollout per draw, all sampled in one call
    mask = torch.ones_like(h, dtype=torch.bool)
    got = select_tokens("entropy", 0.34, h, None, None, mask, torch.Generator().manual_seed(0))  # k = 2 of 6
    assert (got.sum(1) == 2).all()
    target = inclusion_probabilities(weights, 2)
    frequencies = got.double().mean(0).tolist()
    for f, p in zip(frequencies, target):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / draws) + 1e-3, (frequencies, target)


def test_entropy_sampling_zero_entropy_positions_come_last_and_uniform():
    draws = 4000
    h = torch.tensor([[0.0, 0.7, 0.0, 0.0, 0.0, 0.0]]).repeat(draws, 1)
    h[draws // 2 :] = 0.0  # second half: entropy zero everywhere -> uniform
    mask = torch.ones_like(h, dtype=torch.bool)
    got = select_tokens("entropy", 0.34, h, None, None, mask, torch.Generator().manual_seed(1))
    first = got[: draws // 2]
    assert first[:, 1].all()  # the only positive-entropy position is always taken
    others = first[:, [0, 2, 3, 4, 5]].double().mean(0)
    assert (others - 0.2).abs().max() < 0.04
    uniform = got[draws // 2 :].double().mean(0)
    assert (uniform - 2 / 6).abs().max() < 0.04


def test_random_rule_is_uniform():
    draws = 4000
    mask = torch.ones(draws, 5, dtype=torch.bool)
    mask[:, 4] = False
    zeros = torch.zeros(draws, 5)
    got = select_tokens("random", 0.5, zeros, zeros, zeros, mask, torch.Generator().manual_seed(2))
    assert (got.sum(1) == 2).all() and not got[:, 4].any()
    assert (got[:, :4].double().mean(0) - 0.5).abs().max() < 0.04


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_select_tokens_rejects_bad_rule_ratio_and_missing_statistics():
    h, rkl, fkl, mask = make_batch()
    with pytest.raises(ValueError, match="'best'"):
        select_tokens("best", 0.5, h, rkl, fkl, mask)
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"got {ratio}"):
            select_tokens("type_aware", ratio, h, rkl, fkl, mask)
    with pytest.raises(ValueError, match="forward_kl"):
        select_tokens("q3", 0.5, h, rkl, None, mask)


@pytest.mark.parametrize("config_cls", [TIPConfig, TIPGKDConfig])
@pytest.mark.parametrize(
    "field,value",
    [
        ("selection_rule", "soft_or"),
        ("selection_ratio", 0.0),
        ("selection_ratio", 1.5),
        ("selection_ratio", -0.5),
        ("entropy_threshold", 1.0),
        ("entropy_threshold", -0.1),
        ("divergence_threshold", -1.0),
        ("divergence_threshold", float("inf")),
        ("entropy_threshold", "0.5"),
        ("divergence_threshold", "1"),
    ],
)
def test_bad_config_names_field_and_value(tmp_path, config_cls, field, value):
    with pytest.raises(ValueError, match=rf"{field} .*got {value!r}"):
        config_cls(str(tmp_path), bf16=False, use_cpu=True, report_to="none", **{field: value})


@pytest.mark.parametrize("config_cls", [TIPConfig, TIPGKDConfig])
def test_bad_selection_field_is_reported_before_trls_own_checks(tmp_path, config_cls):
    # Without bf16=False / use_cpu=True, TRL's own check fails on a CPU machine: a bad selection field
    # must still be what the error names.
    with pytest.raises(ValueError, match="selection_rule must be one of"):
        config_cls(str(tmp_path), selection_rule="bogus")


def test_good_configs_and_defaults(tmp_path):
    config = TIPConfig(str(tmp_path), bf16=False, use_cpu=True, report_to="none")
    assert config.output_dir == str(tmp_path)
    assert (config.selection_rule, config.selection_ratio, config.beta) == ("type_aware", 0.5, 1.0)
    gkd = TIPGKDConfig(str(tmp_path), bf16=False, use_cpu=True, report_to="none", selection_rule="q3", selection_ratio=0.1)
    assert (gkd.selection_rule, gkd.selection_ratio, gkd.beta) == ("q3", 0.1, 1.0)
