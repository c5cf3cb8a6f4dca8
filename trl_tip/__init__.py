"""TIP for TRL: token-importance selection for on-policy distillation (arXiv 2604.14084).

Which trainer when:
- `TIPTrainer` (on `trl.DistillationTrainer`): on-policy distillation with vLLM or transformers generation and TRL's
  chunked loss, which never holds full logits. The recommended path; selection there saves loss compute and gives
  a cleaner signal, not memory (the chunked loss is already small).
- `TIPGKDTrainer` (on `trl.experimental.gkd.GKDTrainer`): when you need GKD's options (off-policy or mixed data via
  `lmbda`, sequence-level KD). GKD materialises logits; with TIP only the selected positions get logits, which is
  where the paper's peak-memory saving shows.

Pure functions on tensors (`token_statistics`, `token_types`, `select_tokens`, `selection_counts`) are the rules
both trainers run; `chunked_token_statistics` computes the statistics from hidden states without full logits.
"""

from .config import TIPConfig, TIPGKDConfig, TIPSelectionArguments
from .loss import (
    ChunkedStatistics,
    LogitTransform,
    SelectedLoss,
    chunked_token_statistics,
    score_and_select,
    selected_chunked_loss,
)
from .selection import (
    SELECTION_RULES,
    TokenStatistics,
    masked_quantile,
    select_tokens,
    selection_counts,
    selection_summary,
    summary_metrics,
    token_statistics,
    token_types,
)
from .trainer import TIPGKDTrainer, TIPTrainer, logit_transform

__all__ = [
    "SELECTION_RULES",
    "ChunkedStatistics",
    "LogitTransform",
    "SelectedLoss",
    "TIPConfig",
    "TIPGKDConfig",
    "TIPGKDTrainer",
    "TIPSelectionArguments",
    "TIPTrainer",
    "TokenStatistics",
    "chunked_token_statistics",
    "logit_transform",
    "masked_quantile",
    "score_and_select",
    "select_tokens",
    "selected_chunked_loss",
    "selection_counts",
    "selection_summary",
    "summary_metrics",
    "token_statistics",
    "token_types",
]
