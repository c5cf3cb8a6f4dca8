"""TIPConfig and TIPGKDConfig: TRL's distillation configs plus the token-selection knobs.

The selection fields live in one mixin so both configs declare and validate them identically. The mixin comes
first among the bases so that its fields are appended after TRL's (dataclasses collect fields in reverse MRO order):
`TIPConfig("out")` still means `output_dir="out"`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from trl import DistillationConfig
from trl.experimental.gkd import GKDConfig

from .selection import SELECTION_RULES


@dataclass
class TIPSelectionArguments:
    """The TIP token-selection fields shared by `TIPConfig` and `TIPGKDConfig`."""

    selection_rule: str = field(
        default="type_aware",
        metadata={
            "help": "Which completion tokens the distillation loss trains on. `all`: every token (plain "
            "distillation); `entropy`: sampled without replacement with probability proportional to the student's "
            "normalised entropy; `type_aware`: the paper's Soft-OR of capped, min-max normalised entropy and reverse "
            "KL (the main TIP rule); `q3`: confident-and-wrong tokens, ranked by forward KL times (1 - entropy); "
            "`divergence`: the tokens of highest reverse KL; `random`: a uniform sample (the control).",
            "choices": list(SELECTION_RULES),
        },
    )
    selection_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of each rollout's completion tokens to keep, in (0, 1]: a rollout of m tokens keeps "
            "max(1, floor(ratio * m)). The paper uses 0.5 for `entropy` and `type_aware`, 0.1-0.2 for `q3`. Ignored "
            "by `all`."
        },
    )
    entropy_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Boundary between low and high normalised entropy (in [0, 1)) for the logged token-type shares. "
            "`None` uses the median over the batch's completion tokens."
        },
    )
    divergence_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Boundary between low and high reverse KL (in nats, >= 0) for the logged token-type shares. "
            "`None` uses the median over the batch's completion tokens."
        },
    )

    def _validate_selection_arguments(self) -> None:
        if self.selection_rule not in SELECTION_RULES:
            raise ValueError(
                f"selection_rule must be one of {list(SELECTION_RULES)}, got {self.selection_rule!r}. Use `all` for "
                "plain distillation or `type_aware` for the paper's main rule."
            )
        ratio = self.selection_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < ratio <= 1.0):
            raise ValueError(
                f"selection_ratio must be in (0, 1], got {ratio!r}. It is the fraction of each rollout's completion "
                "tokens to train on, e.g. 0.5."
            )
        for name in ("entropy_threshold", "divergence_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"{name} must be a number or None, got {value!r} ({type(value).__name__}).")
        if self.entropy_threshold is not None and not (0.0 <= self.entropy_threshold < 1.0):
            raise ValueError(
                f"entropy_threshold must be in [0, 1) or None, got {self.entropy_threshold!r}. The entropy is "
                "normalised by log|V|, so a threshold outside [0, 1) puts every token on one side; None uses the "
                "batch median."
            )
        if self.divergence_threshold is not None and not (
            math.isfinite(self.divergence_threshold) and self.divergence_threshold >= 0.0
        ):
            raise ValueError(
                f"divergence_threshold must be a finite number >= 0 or None, got {self.divergence_threshold!r}. The "
                "KL divergence is never negative, so a negative threshold makes every token high-divergence; None uses "
                "the batch median."
            )


@dataclass
class TIPConfig(TIPSelectionArguments, DistillationConfig):
    r"""
    Configuration for [`trl_tip.TIPTrainer`]: TRL's [`~trl.DistillationConfig`] plus TIP token selection.

    Parameters (besides those of `DistillationConfig`):
        selection_rule (`str`, defaults to `"type_aware"`): one of `all`, `entropy`, `type_aware`, `q3`,
            `divergence`, `random`.
        selection_ratio (`float`, defaults to `0.5`): fraction in (0, 1] of each rollout's completion tokens kept.
        entropy_threshold (`float` or `None`): low/high entropy boundary for the logged token types; `None` = median.
        divergence_threshold (`float` or `None`): low/high reverse-KL boundary for the logged types; `None` = median.

    `beta` keeps TRL's meaning (0 forward KL, 1 reverse KL, in between generalized JSD) and defaults to 1.0, the
    reverse KL the paper trains with.
    """

    def __post_init__(self):
        self._validate_selection_arguments()  # first: TRL's own checks (bf16 on a CPU, ...) would hide a bad rule
        super().__post_init__()


@dataclass
class TIPGKDConfig(TIPSelectionArguments, GKDConfig):
    r"""
    Configuration for [`trl_tip.TIPGKDTrainer`]: TRL's experimental `GKDConfig` plus TIP token selection.

    Same selection fields as [`TIPConfig`]. `beta` defaults to 1.0 (reverse KL, as in the paper) instead of GKD's
    0.5; `lmbda` keeps GKD's meaning (the share of on-policy micro-batches; 0 is off-policy distillation).
    """

    beta: float = field(
        default=1.0,
        metadata={
            "help": "Interpolation coefficient of the generalized JSD loss: 0.0 forward KL, 1.0 reverse KL (the "
            "paper's loss, the default here), in between the generalized JSD."
        },
    )

    def __post_init__(self):
        self._validate_selection_arguments()  # first: TRL's own checks (bf16 on a CPU, ...) would hide a bad rule
        super().__post_init__()
