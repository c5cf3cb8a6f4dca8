"""Token statistics, the TIP taxonomy and the selection rules: pure functions on tensors.

Design note. Everything here works on padded `(B, T)` tensors (B rollouts, T completion positions) and a boolean
`mask` of the positions that may be trained on (completion tokens; prompt, padding and tool-output positions are
False). No function here knows about models or trainers: the trainers compute the per-position statistics (from
full logits in the tests, from hidden states with a chunked pass in `trl_tip.loss`) and hand them to
`select_tokens`, so both trainer variants run the same rules.

Conventions the paper (arXiv 2604.14084) leaves open, chosen here:
- Budget. A rollout with m valid positions keeps `max(1, floor(ratio * m))` of them (none when m = 0); the product
  is rounded before the floor to absorb binary representation error (0.29 * 100 = 28.999999999999996 in floating
  point, so a plain floor would keep 28 of 100 tokens at ratio 0.29).
- Ranking rules (`type_aware`, `q3`, `divergence`) keep the top of each rollout; ties go to the earlier position
  (stable sort), so the selection is deterministic.
- Batch statistics (the 98th-percentile entropy cap, min-max normalisation, the default quadrant thresholds) are
  taken over the valid positions of the whole batch passed in, as the paper says "in the batch". Quantiles use
  linear interpolation (numpy's default). A constant quantity normalises to 0.
- The Soft-OR score is written 1 - (1 - h^)(1 - d^), which equals the paper's h^ + d^ - h^ d^ but gives exactly 1
  for a capped entropy, so all capped positions tie exactly (instead of differing by rounding noise).
- Q3 ranks the raw forward KL times (1 - h^): the paper normalises the entropy only.
- Sampling rules draw without replacement with the exponential-race (Gumbel top-k) trick: keep the k smallest
  E_t / w_t with E_t ~ Exp(1). That has the same law as k successive multinomial draws without replacement with
  probability proportional to w, but runs for every rollout at once with a different k per rollout. Entropy
  sampling gives positions with h = 0 a weight below any positive h: they are drawn (uniformly) only once every
  positive-entropy position of the rollout is taken, so a rollout whose entropies are all 0 is sampled uniformly.
- No importance reweighting of the sampled tokens (the paper's default in its helper code).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

SELECTION_RULES = ("all", "entropy", "type_aware", "q3", "divergence", "random")
# Rules whose choice is random (they take the generator); the others are deterministic.
SAMPLING_RULES = ("entropy", "random")
# The entropy cap of the paper: the top 2% of the batch's entropies are clipped.
ENTROPY_CAP_QUANTILE = 0.98


class TokenStatistics(NamedTuple):
    """Per-position statistics, each `(B, T)` float32 (or `(N,)` for flattened inputs); 0 where masked.

    entropy:    H(P_S) / log|V|, the student's entropy normalised to [0, 1] (the paper's h).
    reverse_kl: KL(P_S || P_T), the paper's divergence delta and the loss at `beta = 1`.
    forward_kl: KL(P_T || P_S), what the Q3 rule ranks.
    """

    entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor


def token_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> TokenStatistics:
    """Per-position normalised student entropy, reverse KL and forward KL, from full logits.

    This is the plain-PyTorch reference (it holds `(B, T, V)` fp32 tensors); the trainers compute the same numbers
    from hidden states without full logits (`trl_tip.loss.chunked_token_statistics`).

    Args:
        student_logits: `(B, T, V)` (or `(N, V)`), any float dtype.
        teacher_logits: same shape as `student_logits`.
        mask: `(B, T)` (or `(N,)`), bool or 0/1; False/0 positions get 0 in every output.
        temperature: softmax temperature applied to both logits (the paper uses 1).

    Returns:
        `TokenStatistics` of float32 tensors shaped like `mask`, computed in float32 whatever the input dtype.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    if student_logits.shape[:-1] != mask.shape:
        raise ValueError(f"mask must have shape {tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}.")
    vocab = student_logits.shape[-1]
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    ps, pt = log_ps.exp(), log_pt.exp()
    entropy = -(ps * log_ps).sum(-1) / math.log(vocab)
    reverse_kl = (ps * (log_ps - log_pt)).sum(-1)
    forward_kl = (pt * (log_pt - log_ps)).sum(-1)
    valid = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=entropy.device)
    return TokenStatistics(
        torch.where(valid, entropy, zero), torch.where(valid, reverse_kl, zero), torch.where(valid, forward_kl, zero)
    )


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (linear interpolation, like `numpy.quantile`) of `values[mask]`, as a 0-d tensor.

    Runs without a host sync (no boolean indexing): masked entries are sorted to the end. Returns 0 when no position
    is valid.
    """
    flat = values.reshape(-1)
    valid = mask.reshape(-1).bool()
    count = valid.sum()
    ordered = torch.where(valid, flat, torch.full_like(flat, math.inf)).sort().values
    position = q * (count - 1).clamp(min=0).to(flat.dtype)
    low = position.floor().long()
    high = position.ceil().long()
    low_value, high_value = ordered[low], ordered[high]
    result = low_value + (high_value - low_value) * (position - low)
    return torch.where(count > 0, result, torch.zeros_like(result))


def _min_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Min-max over the valid positions of the batch; a constant quantity (max == min) normalises to 0.
    low = torch.where(mask, values, torch.full_like(values, math.inf)).amin()
    high = torch.where(mask, values, torch.full_like(values, -math.inf)).amax()
    span = high - low
    normalised = torch.where(span > 0, (values - low) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return torch.where(mask, normalised, torch.zeros_like(values))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 at least (statistics arrive in bf16 from some callers), float64 kept for references
    return torch.promote_types(x.dtype, torch.float32)


def token_types(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: torch.Tensor,
    entropy_threshold: float | None = None,
    divergence_threshold: float | None = None,
) -> torch.Tensor:
    """The TIP quadrant of each position: 1..4, and 0 where masked.

    Q1 high entropy, high divergence; Q2 high entropy, low divergence; Q3 low entropy, high divergence (confident and
    wrong); Q4 low entropy, low divergence. "High" means strictly above the threshold. A threshold left as None is
    the median over the batch's valid positions (the paper gives no numeric boundary).

    Args:
        entropy: `(B, T)` normalised entropy h.
        divergence: `(B, T)` per-position divergence (the paper uses the reverse KL).
        mask: `(B, T)` bool or 0/1.
        entropy_threshold, divergence_threshold: fixed thresholds, or None for the batch median.

    Returns:
        `(B, T)` int64.
    """
    valid = mask.bool()
    h = entropy.to(_work_dtype(entropy))
    d = divergence.to(_work_dtype(divergence))
    h_threshold = masked_quantile(h, valid, 0.5) if entropy_threshold is None else entropy_threshold
    d_threshold = masked_quantile(d, valid, 0.5) if divergence_threshold is None else divergence_threshold
    high_h = h > h_threshold
    high_d = d > d_threshold
    # Q1 = 1, Q2 = 2, Q3 = 3, Q4 = 4: 1 + (low entropy) * 2 + (low divergence)
    quadrant = 1 + (~high_h).long() * 2 + (~high_d).long()
    return torch.where(valid, quadrant, torch.zeros_like(quadrant))


def selection_counts(mask: torch.Tensor, ratio: float, rule: str = "type_aware") -> torch.Tensor:
    """How many positions each rollout keeps: `(B,)` int64.

    `max(1, floor(ratio * m))` for a rollout with m >= 1 valid positions, 0 for m = 0, and m for rule `all`. The
    count depends on the mask only, so the trainers know the selected-token total of a whole accumulated batch
    before any forward pass (the normaliser under gradient accumulation).
    """
    _check_rule_and_ratio(rule, ratio)
    valid_count = mask.bool().sum(-1)  # (B,)
    if rule == "all":
        return valid_count
    # Rounded before the floor: see the module note on binary representation error.
    budget = torch.floor(valid_count.double() * ratio + 1e-9).long().clamp(min=1)
    return torch.where(valid_count > 0, torch.minimum(budget, valid_count), torch.zeros_like(valid_count))


def _check_rule_and_ratio(rule: str, ratio: float) -> None:
    if rule not in SELECTION_RULES:
        raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {rule!r}.")
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ValueError(f"selection ratio must be in (0, 1], got {ratio!r}.")


def _top_k_per_row(scores: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boolean `(B, T)`: the `counts[b]` highest `scores` of row b among its valid positions (ties: earlier first)."""
    if mask.shape[-1] == 0:
        return mask.clone()
    keyed = torch.where(mask, scores.nan_to_num(nan=-math.inf), torch.full_like(scores, -math.inf))
    order = keyed.argsort(dim=-1, descending=True, stable=True)  # (B, T) positions, best first
    # Rank among valid positions only, so a valid position with a -inf (or NaN) score still counts before any
    # masked one and a masked position can never be chosen.
    valid_before = torch.cumsum(mask.gather(-1, order).long(), dim=-1)  # (B, T) valid positions up to each slot
    valid_rank = torch.empty_like(order)
    valid_rank.scatter_(-1, order, valid_before - 1)
    return mask & (valid_rank < counts.unsqueeze(-1))


def _exponential_race_keys(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Keys whose per-row top-k is a weighted sample without replacement (see the module note)."""
    device = generator.device if generator is not None else weights.device
    race = torch.empty(weights.shape, dtype=weights.dtype, device=device).exponential_(generator=generator)
    race = race.to(weights.device)
    positive = weights > 0
    # log w - log E for positive weights; zero-weight positions come after all of them, in random order.
    safe = torch.where(positive, weights, torch.ones_like(weights))
    return torch.where(positive, safe.log() - race.log(), -1.0e4 - race.log())


def select_tokens(
    rule: str,
    ratio: float,
    entropy: torch.Tensor | None,
    reverse_kl: torch.Tensor | None,
    forward_kl: torch.Tensor | None,
    mask: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The positions each rollout trains on: boolean `(B, T)`, never True where `mask` is False.

    Each rollout with m valid positions keeps `selection_counts(mask, ratio, rule)` of them:
    - `all`: every valid position (ratio ignored).
    - `entropy`: sampled without replacement with probability proportional to h (the paper's entropy sampling).
    - `type_aware`: the paper's Soft-OR: h capped at its 98th percentile over the batch's valid positions, h and the
      reverse KL min-max normalised over the batch's valid positions to h^ and d^, top of
      s = h^ + d^ - h^ d^ per rollout.
    - `q3`: top of forward KL * (1 - h^) per rollout (same cap and normalisation of h): confident-and-wrong tokens.
    - `divergence`: top reverse KL per rollout.
    - `random`: a uniform sample without replacement (the control).

    Args:
        rule: one of `SELECTION_RULES`.
        ratio: fraction in (0, 1].
        entropy: `(B, T)` normalised entropy h (needed by `entropy`, `type_aware`, `q3`).
        reverse_kl: `(B, T)` KL(P_S || P_T) (needed by `type_aware`, `divergence`).
        forward_kl: `(B, T)` KL(P_T || P_S) (needed by `q3`).
        mask: `(B, T)` bool or 0/1.
        generator: random source of the sampling rules (`entropy`, `random`); may live on another device.

    Returns:
        `(B, T)` bool.
    """
    _check_rule_and_ratio(rule, ratio)
    valid = mask.bool()
    if valid.dim() != 2:
        raise ValueError(f"mask must be (batch, completion length), got shape {tuple(valid.shape)}.")
    if rule == "all":
        return valid.clone()
    needed = {
        "entropy": ("entropy",),
        "type_aware": ("entropy", "reverse_kl"),
        "q3": ("entropy", "forward_kl"),
        "divergence": ("reverse_kl",),
        "random": (),
    }[rule]
    given = {"entropy": entropy, "reverse_kl": reverse_kl, "forward_kl": forward_kl}
    for name in needed:
        if given[name] is None:
            raise ValueError(f"selection rule {rule!r} needs `{name}`, got None.")
        if given[name].shape != valid.shape:
            raise ValueError(f"`{name}` must have the mask's shape {tuple(valid.shape)}, got {tuple(given[name].shape)}.")
    counts = selection_counts(valid, ratio, rule)  # (B,)

    if rule == "random":
        scores = _exponential_race_keys(torch.ones(valid.shape, dtype=torch.float32, device=valid.device), generator)
    elif rule == "entropy":
        h = entropy.to(_work_dtype(entropy)).clamp(min=0)
        scores = _exponential_race_keys(torch.where(valid, h, torch.zeros_like(h)), generator)
    elif rule == "divergence":
        scores = reverse_kl.to(_work_dtype(reverse_kl))
    else:
        h = entropy.to(_work_dtype(entropy))
        cap = masked_quantile(h, valid, ENTROPY_CAP_QUANTILE)
        h_hat = _min_max(torch.minimum(h, cap), valid)
        if rule == "type_aware":
            d_hat = _min_max(reverse_kl.to(h.dtype), valid)
            scores = 1.0 - (1.0 - h_hat) * (1.0 - d_hat)
        else:  # q3
            scores = forward_kl.to(h.dtype) * (1.0 - h_hat)
    return _top_k_per_row(scores, counts, valid)


# Order of the entries of `selection_summary`; `summary_metrics` names them.
_SUMMARY_FIELDS = (
    "valid",
    "selected",
    "q1",
    "q2",
    "q3",
    "q4",
    "entropy_all",
    "entropy_selected",
    "reverse_kl_all",
    "reverse_kl_selected",
)


def selection_summary(
    entropy: torch.Tensor,
    reverse_kl: torch.Tensor,
    mask: torch.Tensor,
    selected: torch.Tensor,
    types: torch.Tensor,
) -> torch.Tensor:
    """Sums that the trainers log, as one float32 vector (one gather and one host transfer per step).

    Entries (see `_SUMMARY_FIELDS`): valid count, selected count, count per quadrant 1..4, sum of h over valid and
    over selected, sum of the reverse KL over valid and over selected. Sums, not means, so they add across
    processes and micro-batches; `summary_metrics` turns them into shares and means.
    """
    valid = mask.bool()
    chosen = selected.bool() & valid
    h = entropy.float()
    d = reverse_kl.float()
    parts = [
        valid.sum(),
        chosen.sum(),
        *[(types == quadrant).sum() for quadrant in (1, 2, 3, 4)],
        (h * valid).sum(),
        (h * chosen).sum(),
        (d * valid).sum(),
        (d * chosen).sum(),
    ]
    return torch.stack([p.float() for p in parts])


def summary_metrics(summary: torch.Tensor | list[float], prefix: str = "tip/") -> dict[str, float]:
    """Shares per quadrant, share selected, mean h and reverse KL of selected vs all tokens (for TRL's metrics)."""
    values = dict(zip(_SUMMARY_FIELDS, summary.tolist() if isinstance(summary, torch.Tensor) else summary))
    valid, selected = values["valid"], values["selected"]

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else 0.0

    metrics = {f"{prefix}share_q{q}": ratio(values[f"q{q}"], valid) for q in (1, 2, 3, 4)}
    metrics[f"{prefix}share_selected"] = ratio(selected, valid)
    metrics[f"{prefix}entropy_all"] = ratio(values["entropy_all"], valid)
    metrics[f"{prefix}entropy_selected"] = ratio(values["entropy_selected"], selected)
    metrics[f"{prefix}reverse_kl_all"] = ratio(values["reverse_kl_all"], valid)
    metrics[f"{prefix}reverse_kl_selected"] = ratio(values["reverse_kl_selected"], selected)
    return metrics

