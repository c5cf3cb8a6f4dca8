"""TIPTrainer (on TRL's DistillationTrainer) and TIPGKDTrainer (on TRL's experimental GKDTrainer).

Design note. Both trainers are thin: they run the backbones, hand hidden states to the shared selection core
(`trl_tip.loss.score_and_select`, which calls `trl_tip.selection`), and compute the parent's divergence over the
selected positions only.

- `TIPTrainer` replaces `DistillationTrainer._compute_loss`: backbones as the parent runs them, then
  `selected_chunked_loss` (no-grad chunked statistics of every completion position, projections with gradients
  over the selected positions only). Use it for on-policy distillation: it generates with vLLM or transformers and
  never holds `(B, T, V)` logits.
- `TIPGKDTrainer` replaces `GKDTrainer.compute_loss`: backbones, the same statistics and selection, then the
  `lm_head` modules on the selected hidden states only and GKD's own `generalized_jsd_loss` on those rows. Use it
  where GKD is needed (off-policy or mixed data, `lmbda < 1`, sequence-level KD): with TIP the logits exist only for
  the selected positions, which is where the paper's memory saving shows.

Normalisation under gradient accumulation. Every rule keeps a count per rollout that depends only on the loss
mask (`selection_counts`), so the selected-token total of all accumulated micro-batches (and all processes) is known
before any forward pass, like TRL's `num_items_in_batch`:
- `TIPTrainer` overrides `_generate_and_score_completions` (which sees the whole generation batch) to set
  `num_items_in_batch` to that total.
- `TIPGKDTrainer` overrides `_get_num_items_in_batch` to count selected tokens from the labels, and
  `get_batch_samples` to run GKD's on-policy generation for every micro-batch of the accumulation cycle before
  counting (GKD itself generates inside `training_step`, after transformers has counted the dataset labels).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.integrations import is_fsdp_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast
from trl import DistillationTrainer
from trl.experimental.gkd import GKDTrainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation

from .config import TIPConfig, TIPGKDConfig, TIPSelectionArguments
from .loss import LogitTransform, score_and_select, selected_chunked_loss
from .selection import selection_counts, summary_metrics

# Key `TIPGKDTrainer.get_batch_samples` sets on micro-batches whose rollouts it already generated.
_ROLLOUTS_DONE = "tip_rollouts_done"


def logit_transform(config) -> LogitTransform:
    """The logit scale and final softcap a model applies after its `lm_head` (TRL 1.16's lookup, in one place)."""
    config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    return LogitTransform(1.0 if scale is None else scale, getattr(config, "final_logit_softcapping", None))


def _apply_transform(logits: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    if transform.scale != 1.0:
        logits = logits * transform.scale
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    return logits


def _selection_generator(args, accelerator) -> torch.Generator:
    # A dedicated stream for the sampling rules, distinct per process, that leaves the global RNG untouched.
    return torch.Generator(device=accelerator.device).manual_seed(int(args.seed) + accelerator.process_index)


def _check_selection_args(args, expected: type) -> None:
    if not isinstance(args, expected):
        other = " (TIPConfig is for TIPTrainer, TIPGKDConfig for TIPGKDTrainer)" if isinstance(
            args, TIPSelectionArguments) else ""
        raise TypeError(f"args must be a {expected.__name__} (it carries the selection fields), got "
                        f"{type(args).__name__}{other}.")


def _check_teacher(trainer: str, args: tuple, kwargs: dict) -> None:
    if kwargs.get("teacher_model", args[1] if len(args) > 1 else None) is None:
        raise ValueError(f"{trainer} needs `teacher_model=` (a model or a model id): the selection statistics and "
                         "the loss read the teacher's logits in this process; got None.")


@torch.no_grad()
def _broadcast_from_main_process(model: torch.nn.Module) -> None:
    """Copy process 0's parameters and buffers into every process's copy of an unsharded model (in place)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if isinstance(tensor, torch.distributed.tensor.DTensor):
            raise NotImplementedError(
                "The teacher has DTensor (sharded) parameters under FSDP; pass an unsharded teacher (a path or a plain "
                "`PreTrainedModel`): the trainer keeps one full copy of it per process, as its TRL parent does."
            )
        torch.distributed.broadcast(tensor.data, src=0)


def _place_teacher_under_fsdp(trainer) -> None:
    """Under FSDP: put the teacher on this process's device, with process 0's weights.

    The TRL parents prepare the teacher with `prepare_model(evaluation_mode=True)`, which under FSDP neither wraps
    nor moves it (TRL issue #2580), so two fixes, for a teacher kept whole on every process as under DDP:
    - placement: the teacher stays where `from_pretrained` left it (the CPU) while the student is on the GPU;
    - weights: with FSDP's CPU-RAM-efficient loading (`FSDP_CPU_RAM_EFFICIENT_LOADING=true`, accelerate's default
      for `--use_fsdp`), transformers reads the checkpoint on each node's first process only and fills the other
      copies with zeros, counting on FSDP's wrapping to broadcast from process 0; the unwrapped teacher never gets
      that broadcast, and every other process would distil from an all-zero (uniform) teacher. One broadcast at
      start-up. `transformers.integrations.is_fsdp_enabled` is transformers' own test for that loading mode (it also
      holds when accelerate falls back to DDP, as it does on a CPU process group).
    """
    if trainer.teacher_model is None or trainer.accelerator.num_processes == 1 or trainer.is_deepspeed_enabled:
        return  # (DeepSpeed: the parents partition the teacher with `prepare_deepspeed`)
    if not (trainer.is_fsdp_enabled or is_fsdp_enabled()):
        return
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    if getattr(teacher, "hf_device_map", None) is None:  # a `device_map` placement is the user's
        teacher.to(trainer.accelerator.device)
    _broadcast_from_main_process(teacher)


class _TIPMetricsMixin:
    """Logs the selection summary through the trainer's `_metrics` (TRL's per-step metrics)."""

    def _log_selection_summary(self, summary: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        # One gather and one host transfer for every TIP metric of the step.
        summary = self.accelerator.gather_for_metrics(summary.detach().unsqueeze(0)).sum(0)
        for key, value in summary_metrics(summary).items():
            self._metrics[mode][key].append(value)


class TIPTrainer(_TIPMetricsMixin, DistillationTrainer):
    """`trl.DistillationTrainer` whose loss trains only on the completion tokens TIP selects.

    Takes the parent's arguments; `args` must be a `TIPConfig`. With `selection_rule="all"` the loss and gradients
    equal the parent's.
    """

    _tag_names = ["trl", "distillation", "tip"]

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None:
            raise ValueError("TIPTrainer needs `args=TIPConfig(...)`: the selection rule and ratio live there.")
        _check_selection_args(config, TIPConfig)
        _check_teacher(type(self).__name__, args, kwargs)
        super().__init__(*args, **kwargs)
        _place_teacher_under_fsdp(self)
        self.selection_rule = config.selection_rule
        self.selection_ratio = config.selection_ratio
        self._selection_generator = _selection_generator(config, self.accelerator)
        self._pending_summary: torch.Tensor | None = None

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        # The parent counts every completion token of the generation batch (all accumulation micro-batches); the
        # loss divides by the selected tokens instead, whose count per rollout follows from the mask alone.
        loss_mask = output["completion_mask"]
        if "tool_mask" in output:
            loss_mask = loss_mask * output["tool_mask"]
        selected = selection_counts(loss_mask, self.selection_ratio, self.selection_rule).sum()
        output["num_items_in_batch"] = self.accelerator.gather(selected).sum()
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Logged here, after the forward redirection returned (the parent's reason: no collective inside the
        # DDP/FSDP-wrapped forward).
        if self._pending_summary is not None:
            self._log_selection_summary(self._pending_summary)
            self._pending_summary = None
        return result

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_mask = inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal_keys = (
            "pixel_values",
            "image_grid_thw",
            "pixel_attention_mask",
            "spatial_shapes",
            "image_sizes",
            "token_type_ids",
            "mm_token_type_ids",
            "image_position_ids",
        )
        multimodal_inputs = {k: inputs[k] for k in multimodal_keys if k in inputs}

        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal_inputs
        )  # (B, C, H_s)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                logits_to_keep,
                **multimodal_inputs,
            )  # (B, C, H_t)

        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(
                f"The student `lm_head` is on {student_head.weight.device} but the teacher `lm_head` is on "
                f"{teacher_head.weight.device}. Place both on the same device in their `device_map`."
            )
        device = student_head.weight.device
        result = selected_chunked_loss(
            student_hidden.to(device),
            teacher_hidden.to(device),
            (student_head.weight, student_head.bias),
            (teacher_head.weight, teacher_head.bias),
            loss_mask.to(device),
            self.beta,
            self.selection_rule,
            self.selection_ratio,
            num_items_in_batch=num_items_in_batch,
            temperature=self.temperature,
            student_transform=logit_transform(unwrapped_student.config),
            teacher_transform=logit_transform(unwrapped_teacher.config),
            generator=self._selection_generator,
            entropy_threshold=self.args.entropy_threshold,
            divergence_threshold=self.args.divergence_threshold,
        )
        self._pending_summary = result.summary
        n_valid = torch.as_tensor(result.valid_count, device=device)
        return result.loss, result.entropy_sum.detach(), n_valid


def _backbone_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Last hidden state `(B, L, H)` of a causal LM (or a PEFT-wrapped one) without its `lm_head`."""
    if is_peft_model(model):
        model = model.base_model.model
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class TIPGKDTrainer(_TIPMetricsMixin, GKDTrainer):
    """`trl.experimental.gkd.GKDTrainer` whose loss trains only on the tokens TIP selects.

    Takes the parent's arguments; `args` must be a `TIPGKDConfig`. Logits (with gradients) exist only for the
    selected positions. With `selection_rule="all"` the loss and gradients equal the parent's. Like the parent, the
    loss applies no temperature (GKD's `temperature` is the sampling temperature), and the divergence runs in the
    logits' dtype.
    """

    _tag_names = ["trl", "gkd", "tip"]
    # `compute_loss` divides by the selected-token count of the whole accumulated batch (`_get_num_items_in_batch`).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None:
            raise ValueError("TIPGKDTrainer needs `args=TIPGKDConfig(...)`: the selection rule and ratio live there.")
        _check_selection_args(config, TIPGKDConfig)
        _check_teacher(type(self).__name__, args, kwargs)
        super().__init__(*args, **kwargs)
        _place_teacher_under_fsdp(self)
        self.selection_rule = config.selection_rule
        self.selection_ratio = config.selection_ratio
        self._selection_generator = _selection_generator(config, self.accelerator)
        self._forward_redirection = _ForwardRedirection()

    # ---- gradient-accumulation-correct normalisation -------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(
            selection_counts(batch["labels"][:, 1:] != -100, self.selection_ratio, self.selection_rule).sum()
            for batch in batch_samples
        )
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        # GKD's rollouts, moved here from `training_step` so the count below sees the generated completions.
        for inputs in batch_samples:
            self._maybe_generate(self.model_wrapped, inputs)
            inputs[_ROLLOUTS_DONE] = True
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _maybe_generate(self, model, inputs: dict[str, Any]) -> None:
        # `GKDTrainer.training_step`'s choice, unchanged: on-policy with probability lmbda, else teacher rollouts
        # with `seq_kd`, else the dataset's completion.
        if random.random() <= self.lmbda:
            source, kwargs = model, {"gradient_checkpointing_kwargs": self.args.gradient_checkpointing_kwargs}
        elif self.seq_kd:
            source, kwargs = self.teacher_model, {}
        else:
            return
        with unwrap_model_for_generation(
            source, self.accelerator, generation_kwargs=self.generation_kwargs, **kwargs
        ) as unwrapped_model:
            new_input_ids, new_attention_mask, new_labels = self.generate_on_policy_outputs(
                unwrapped_model, inputs, self.generation_config
            )
        inputs["input_ids"] = new_input_ids
        inputs["attention_mask"] = new_attention_mask
        inputs["labels"] = new_labels

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs.pop(_ROLLOUTS_DONE, False):
            # Rollouts already generated in `get_batch_samples`: skip GKD's own generation.
            return super(GKDTrainer, self).training_step(model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- loss -------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(_ROLLOUTS_DONE, None)
        unwrapped_student = self.accelerator.unwrap_model(model)
        loss, summary = self._forward_redirection(
            model, unwrapped_student, self._selected_loss, unwrapped_student, inputs, num_items_in_batch
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # The count spans every process and DDP averages gradients across them (as `Trainer.compute_loss` does).
            loss = loss * self.accelerator.num_processes
        self._log_selection_summary(summary)
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def _selected_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        # Standard causal shift, as in GKDTrainer.compute_loss: hidden state i predicts token i + 1.
        loss_mask = inputs["labels"][:, 1:] != -100  # (B, L-1)
        student_hidden = _backbone_hidden_states(unwrapped_student, input_ids, attention_mask)[:, :-1]  # (B, L-1, H_s)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = _backbone_hidden_states(unwrapped_teacher, input_ids, attention_mask)[:, :-1]
        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        device = student_head.weight.device
        student_transform = logit_transform(unwrapped_student.config)
        teacher_transform = logit_transform(unwrapped_teacher.config)
        loss_mask = loss_mask.to(device)
        batch, length = loss_mask.shape
        # GKD's loss has no temperature, so neither have the statistics.
        valid_index, _, selected, summary = score_and_select(
            student_hidden.to(device),
            teacher_hidden.to(device),
            (student_head.weight, student_head.bias),
            (teacher_head.weight, teacher_head.bias),
            loss_mask,
            self.selection_rule,
            self.selection_ratio,
            1.0,
            student_transform,
            teacher_transform,
            self._selection_generator,
            self.args.entropy_threshold,
            self.args.divergence_threshold,
        )
        selected_index = selected.reshape(-1).nonzero().squeeze(-1)  # (n,)
        h_s = student_hidden.reshape(batch * length, -1).index_select(0, selected_index.to(student_hidden.device))
        h_t = teacher_hidden.reshape(batch * length, -1).index_select(0, selected_index.to(teacher_hidden.device))
        student_logits = _apply_transform(student_head(h_s.to(device)), student_transform)  # (n, V), with grad
        with torch.no_grad():
            teacher_logits = _apply_transform(teacher_head(h_t.to(device)), teacher_transform)  # (n, V)
        denominator = summary[1].clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = self.generalized_jsd_loss(
            student_logits, teacher_logits, labels=None, beta=self.beta, num_items_in_batch=denominator
        )
        return loss, summary
