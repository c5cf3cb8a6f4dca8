"""Selected-token distillation losses from hidden states, built on TRL 1.16's chunked divergence kernel.

Design note. TRL's `ChunkedDivergenceFunction` projects both models' hidden states to the vocabulary on
`[4096, 32768]` tiles and folds each tile into online-logsumexp statistics; those statistics already hold
everything TIP needs per position: the student's entropy, and both KL directions (the reverse KL from the
student-weighted logit gap, the forward KL from the teacher-weighted gap). So the TIP step is:

1. `chunked_token_statistics`: one no-grad pass over every valid position with TRL's own fold (`_stats_kernel`
   on Triton devices, `_stats_tile` elsewhere) that returns entropy, reverse KL, forward KL and both log-normalisers.
2. `select_tokens` (in `trl_tip.selection`) on those statistics.
3. The loss over the selected positions only. For `beta` 0 or 1 the per-token divergence was already computed in
   step 1, so `SelectedDivergenceFunction` returns it as the forward and runs TRL's own backward
   (`ChunkedDivergenceFunction.backward`: re-project, gradient tiles, accumulate) over the selected rows only; the
   projections with gradients then cost ratio x the all-token ones. For the generalized JSD (0 < beta < 1) the
   mixture needs a second pass, so the selected rows go through `ChunkedDivergenceFunction` itself.

Nothing of shape (positions, vocabulary) is ever held beyond one tile. The GKD variant uses step 1 and 2 and then
projects the selected hidden states with the `lm_head` modules (see `trl_tip.trainer`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributed.tensor import Partial
from trl.kernels.chunked_divergence import (
    TOKEN_CHUNK_SIZE,
    VOCAB_CHUNK_SIZE,
    ChunkedDivergenceFunction,
    _compute_dtype,
    _project,
    _stats_kernel,
    _stats_tile,
)
from trl.kernels.chunked_logprob import _BLOCK_SIZE, _use_triton
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .selection import select_tokens, selection_summary, token_types


class LogitTransform(NamedTuple):
    """How a model turns its `lm_head` output into logits: `softcap * tanh(scale * y / softcap)`, then `/ T`."""

    scale: float = 1.0
    softcap: float | None = None


class ChunkedStatistics(NamedTuple):
    """Per-position float32 `(N,)` tensors from `chunked_token_statistics`.

    entropy is in nats (not normalised); `student_log_z`/`teacher_log_z` are the log-normalisers of the tempered
    logits, which the loss's backward reuses.
    """

    entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    student_log_z: torch.Tensor
    teacher_log_z: torch.Tensor


def _kernel_args(temperature: float, student: LogitTransform, teacher: LogitTransform) -> dict:
    # Exactly the keyword arguments `ChunkedDivergenceFunction` hands its kernels (and stores as `ctx.kernel_args`)
    return {
        "s_scale": student.scale,
        "s_softcap": student.softcap or 1.0,
        "t_scale": teacher.scale,
        "t_softcap": teacher.softcap or 1.0,
        "inv_t": 1 / temperature,
        "S_HAS_SOFTCAP": student.softcap is not None,
        "T_HAS_SOFTCAP": teacher.softcap is not None,
    }


def _full_tensor(weight: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The whole of a head weight that FSDP2 holds sharded (a DTensor), gathered once; other tensors unchanged.

    The head is a DTensor here when FSDP2 wraps it in a unit of its own (an `lm_head` or tied embedding wrapped
    apart from the root): that unit's forward never runs, since the loss reads the weight directly, so FSDP's own
    gradient reduce-scatter never fires either. The gradient of the gathered weight holds this process's
    contribution only, so it is declared `Partial("avg")`: the backward reduce-scatters and averages it into the
    shards, as FSDP2 does for every other parameter. (A plain `full_tensor()`, as in TRL 1.16's
    `_chunked_divergence_loss`, assumes a replicated gradient: each shard would keep its own process's part only.)
    """
    if weight is not None and isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
        if dtype is not None:
            weight = weight.to(dtype)
    return weight


@torch.no_grad()
def chunked_token_statistics(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    temperature: float = 1.0,
    student_transform: LogitTransform = LogitTransform(),
    teacher_transform: LogitTransform = LogitTransform(),
) -> ChunkedStatistics:
    """Entropy, reverse KL and forward KL of every row, without materialising `(N, V)` logits.

    One pass of TRL's online-logsumexp fold over `[4096, 32768]` projection tiles (the forward of
    `ChunkedDivergenceFunction` with both KL directions read from the same statistics).

    Args:
        student_hidden: `(N, H_s)` student hidden states of the positions to score.
        student_weight: `(V, H_s)` student `lm_head` weight; `student_bias` `(V,)` or None.
        teacher_hidden: `(N, H_t)`; `teacher_weight` `(V, H_t)`; `teacher_bias` `(V,)` or None.
        temperature: softmax temperature of both models.
        student_transform, teacher_transform: logit scale and final softcap of each model.

    Returns:
        `ChunkedStatistics` of float32 `(N,)` tensors.
    """
    device = student_hidden.device
    rows_total = student_hidden.shape[0]
    s_dtype, t_dtype = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
    kernel_args = _kernel_args(temperature, student_transform, teacher_transform)

    def zeros():
        return torch.zeros((rows_total,), device=device, dtype=torch.float32)

    s_max, t_max = zeros() - math.inf, zeros() - math.inf
    s_sum, s_x_sum, t_sum, t_weighted_gap, s_weighted_gap = zeros(), zeros(), zeros(), zeros(), zeros()
    rows = min(rows_total, TOKEN_CHUNK_SIZE)
    s_buf = torch.empty((rows, VOCAB_CHUNK_SIZE), device=device, dtype=torch.float32)
    t_buf = torch.empty((rows, VOCAB_CHUNK_SIZE), device=device, dtype=torch.float32)
    with maybe_gather_lm_head_ctx(student_weight, student_bias), maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
        vocab = student_weight.shape[0]
        fold = _stats_kernel if _use_triton(device) else None
        for token_start in range(0, rows_total, TOKEN_CHUNK_SIZE):
            token_end = min(token_start + TOKEN_CHUNK_SIZE, rows_total)
            n = token_end - token_start
            h_s = student_hidden[token_start:token_end].to(s_dtype)
            h_t = teacher_hidden[token_start:token_end].to(t_dtype)
            sl = slice(token_start, token_end)
            for start in range(0, vocab, VOCAB_CHUNK_SIZE):
                end = min(start + VOCAB_CHUNK_SIZE, vocab)
                s_tile, t_tile = s_buf[:n, : end - start], t_buf[:n, : end - start]
                _project(s_tile, h_s, student_weight, student_bias, start, end, s_dtype)
                _project(t_tile, h_t, teacher_weight, teacher_bias, start, end, t_dtype)
                (fold[(n,)] if fold is not None else _stats_tile)(
                    s_tile,
                    s_tile.stride(0),
                    t_tile,
                    t_tile.stride(0),
                    s_max[sl],
                    s_sum[sl],
                    s_x_sum[sl],
                    t_max[sl],
                    t_sum[sl],
                    t_weighted_gap[sl],
                    s_weighted_gap[sl],
                    end - start,
                    BLOCK_SIZE=_BLOCK_SIZE,
                    **kernel_args,
                )
    s_log_z = s_max + torch.log(s_sum)
    t_log_z = t_max + torch.log(t_sum)
    entropy = s_log_z - s_x_sum / s_sum
    reverse_kl = s_weighted_gap / s_sum - s_log_z + t_log_z
    forward_kl = t_weighted_gap / t_sum - t_log_z + s_log_z
    return ChunkedStatistics(entropy, reverse_kl, forward_kl, s_log_z, t_log_z)


class SelectedDivergenceFunction(torch.autograd.Function):
    """Per-row forward or reverse KL whose value was computed by `chunked_token_statistics`.

    The forward returns the given per-row divergence (no projection); the backward is TRL's
    `ChunkedDivergenceFunction.backward`, run over these rows only. The first six inputs are those of
    `ChunkedDivergenceFunction`, in the same order, so its backward reads `ctx` unchanged.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,  # (n, H_s), the selected rows
        student_weight: torch.Tensor,  # (V, H_s)
        student_bias: torch.Tensor | None,  # (V,)
        teacher_hidden: torch.Tensor,  # (n, H_t)
        teacher_weight: torch.Tensor,  # (V, H_t)
        teacher_bias: torch.Tensor | None,  # (V,)
        divergence: torch.Tensor,  # (n,) fp32: KL of these rows for `beta`
        student_log_z: torch.Tensor,  # (n,) fp32
        teacher_log_z: torch.Tensor,  # (n,) fp32
        beta: float,
        kernel_args: dict,
    ) -> torch.Tensor:
        if beta not in (0.0, 1.0):
            raise ValueError(f"SelectedDivergenceFunction covers beta 0.0 or 1.0 only, got {beta}.")
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            student_log_z,
            teacher_log_z,
            divergence,  # the `aux` of modes 0 and 1 is the per-token divergence itself
        )
        ctx.dtypes = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
        ctx.beta = beta
        ctx.mode = 0 if beta == 0.0 else 1
        ctx.kernel_args = kernel_args
        return divergence.clone()

    @staticmethod
    def backward(ctx, grad_divergence: torch.Tensor | None):  # type: ignore[override]
        grads = ChunkedDivergenceFunction.backward(ctx, grad_divergence, None)
        return (*grads[:3], *(None,) * 8)


class SelectedLoss(NamedTuple):
    """What one selected-token loss computation returns.

    loss: scalar; the summed per-token divergence over the selected positions divided by the normaliser.
    selected: `(B, T)` bool, the positions trained on.
    entropy_sum: sum of the student entropy (nats) over all valid positions (TRL's `entropy` metric).
    valid_count: number of valid positions.
    summary: `selection_summary` vector for the TIP metrics.
    """

    loss: torch.Tensor
    selected: torch.Tensor
    entropy_sum: torch.Tensor
    valid_count: torch.Tensor
    summary: torch.Tensor


def score_and_select(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    loss_mask: torch.Tensor,
    rule: str,
    ratio: float,
    temperature: float = 1.0,
    student_transform: LogitTransform = LogitTransform(),
    teacher_transform: LogitTransform = LogitTransform(),
    generator: torch.Generator | None = None,
    entropy_threshold: float | None = None,
    divergence_threshold: float | None = None,
):
    """The shared selection core of both trainers: statistics of every valid position, then the selection.

    Args:
        student_hidden: `(B, T, H_s)` (may require grad; only read here).
        teacher_hidden: `(B, T, H_t)`.
        student_head, teacher_head: `(weight (V, H), bias (V,) or None)` of each model's `lm_head`.
        loss_mask: `(B, T)` positions that may be trained on.

    Returns:
        `(valid_index, stats, selected, summary)`: `valid_index` `(N,)` flat indices of the valid positions,
        `stats` the `ChunkedStatistics` of those positions, `selected` `(B, T)` bool, `summary` the metrics vector.
    """
    batch, length = loss_mask.shape
    valid = loss_mask.bool()
    # Boolean compaction needs the count on the host (one sync per step, as in TRL's own chunked loss).
    valid_index = valid.reshape(-1).nonzero().squeeze(-1)  # (N,)
    h_s = student_hidden.detach().reshape(batch * length, -1).index_select(0, valid_index)  # (N, H_s)
    h_t = teacher_hidden.detach().reshape(batch * length, -1).index_select(0, valid_index)  # (N, H_t)
    stats = chunked_token_statistics(
        h_s, *student_head, h_t, *teacher_head, temperature, student_transform, teacher_transform
    )
    vocab = student_head[0].shape[0]

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(batch * length, dtype=torch.float32, device=values.device)
        return full.index_copy(0, valid_index, values).reshape(batch, length)  # (B, T)

    entropy = scatter(stats.entropy / math.log(vocab))
    reverse_kl = scatter(stats.reverse_kl)
    forward_kl = scatter(stats.forward_kl)
    selected = select_tokens(rule, ratio, entropy, reverse_kl, forward_kl, valid, generator)
    types = token_types(entropy, reverse_kl, valid, entropy_threshold, divergence_threshold)
    summary = selection_summary(entropy, reverse_kl, valid, selected, types)
    return valid_index, stats, selected, summary


def selected_chunked_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    loss_mask: torch.Tensor,
    beta: float,
    rule: str,
    ratio: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    temperature: float = 1.0,
    student_transform: LogitTransform = LogitTransform(),
    teacher_transform: LogitTransform = LogitTransform(),
    generator: torch.Generator | None = None,
    entropy_threshold: float | None = None,
    divergence_threshold: float | None = None,
) -> SelectedLoss:
    """TRL's chunked distillation loss (`beta` semantics) averaged over the tokens `rule` selects.

    Args:
        student_hidden: `(B, T, H_s)` student backbone output aligned to the completion tokens (with grad).
        teacher_hidden: `(B, T, H_t)` teacher backbone output (no grad).
        student_head, teacher_head: `(weight, bias)` of each `lm_head`.
        loss_mask: `(B, T)` completion positions that may be trained on.
        beta: 0 forward KL, 1 reverse KL, in between generalized JSD.
        rule, ratio: the selection (see `trl_tip.select_tokens`).
        num_items_in_batch: the selected-token count over the whole (accumulated, all-process) batch, or None for
            the local selected count (clamped to 1, so an empty selection gives a finite 0).

    Returns:
        `SelectedLoss`.
    """
    student_weight = _full_tensor(student_head[0], student_hidden.dtype)
    teacher_weight = _full_tensor(teacher_head[0], teacher_hidden.dtype)
    student_head = (student_weight, _full_tensor(student_head[1]))
    teacher_head = (teacher_weight, _full_tensor(teacher_head[1]))
    valid_index, stats, selected, summary = score_and_select(
        student_hidden,
        teacher_hidden,
        student_head,
        teacher_head,
        loss_mask,
        rule,
        ratio,
        temperature,
        student_transform,
        teacher_transform,
        generator,
        entropy_threshold,
        divergence_threshold,
    )
    batch, length = loss_mask.shape
    # Selected rows as positions among the valid ones (to pick their statistics) and among all (to pick hidden states)
    selected_in_valid = selected.reshape(-1).index_select(0, valid_index).nonzero().squeeze(-1)  # (n,)
    selected_index = valid_index.index_select(0, selected_in_valid)  # (n,)
    h_s = student_hidden.reshape(batch * length, -1).index_select(0, selected_index)  # (n, H_s), with grad
    h_t = teacher_hidden.reshape(batch * length, -1).index_select(0, selected_index)  # (n, H_t)
    kernel_args = _kernel_args(temperature, student_transform, teacher_transform)
    if beta in (0.0, 1.0):
        divergence = (stats.forward_kl if beta == 0.0 else stats.reverse_kl).index_select(0, selected_in_valid)
        per_token = SelectedDivergenceFunction.apply(
            h_s,
            *student_head,
            h_t,
            *teacher_head,
            divergence,
            stats.student_log_z.index_select(0, selected_in_valid),
            stats.teacher_log_z.index_select(0, selected_in_valid),
            beta,
            kernel_args,
        )
    else:
        per_token, _ = ChunkedDivergenceFunction.apply(
            h_s,
            *student_head,
            h_t,
            *teacher_head,
            beta,
            temperature,
            student_transform.scale,
            student_transform.softcap,
            teacher_transform.scale,
            teacher_transform.softcap,
        )
    loss = per_token.sum()
    if num_items_in_batch is None:
        loss = loss / summary[1].clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return SelectedLoss(loss, selected, stats.entropy.sum(), valid_index.numel(), summary)
