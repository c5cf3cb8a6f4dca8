"""What the `recipes/` notebooks run: a student beside a real teacher, prompts, TIP training per rule, held-out
divergence, and the plots. The notebooks only call these functions (no logic lives only in a notebook).

Design note
-----------
- Student: the teacher truncated to its first `num_layers` decoder layers (same tokenizer, embeddings and head), so
  on-policy distillation starts from a model that speaks the vocabulary but has lost most of the teacher's depth.
  It is saved as a plain HF folder because TRL's vLLM integration loads the student by `name_or_path`.
- Held-out divergence: the mean per-token reverse KL `KL(p_student || p_teacher)` (the loss TIP trains with at
  `beta=1`) over the student's own greedy answers to held-out prompts, regenerated at each measurement: the
  on-policy objective on prompts never trained on, deterministic for given weights. (Scoring fixed teacher-written
  answers instead was tried: with a 2-layer student that number barely moves in a few steps, 9.29 -> 9.25 nats for
  `all` over 5 steps, because it measures how the student models the teacher's text, not its own rollouts.)
- Rules are compared from the same initial student, the same seed, data order and number of steps; only
  `selection_rule` / `selection_ratio` change.
- vLLM rollouts: `TIPTrainer` keeps TRL's generation path, so `use_vllm=True, vllm_mode="colocate"` builds TRL's
  own in-process vLLM engine for the student and syncs the weights into it every step. One engine start per
  trainer is the dominant cost on a CPU, so `share_vllm_generation` hands the first trainer's engine to the next
  ones (TRL pushes the new student's weights into it before its first rollout). Server mode (`trl vllm-serve`) does
  not work without CUDA: `VLLMClient.init_communicator` raises NotImplementedError because TRL's weight sync runs
  on vLLM's NCCL weight-transfer engine; generation through the server alone would work, but the served student
  could then never be updated, which is not on-policy distillation.
- Rollouts from a vLLM OpenAI-compatible server (`ServerRollouts`, the long-rollouts recipe): TRL's trainer asks
  its `vllm_generation` object for two things, `sync_weights()` when the optimizer step changed and
  `generate(prompt_ids, ...)` for completion ids. `ServerRollouts` answers both against any server object with
  `complete_ids(prompt_ids, max_tokens, temperature, ...)` and `reload_weights(folder)` (e.g.
  `vllm_asynctls.recipes_support.OpenAIServer(..., dev_mode=True)`, which may serve with asynctls): the student is
  saved as safetensors into one folder and the server reloads it in place, so every rollout is sampled by the
  current student (on-policy, as TRL's colocate mode), through the server's own attention backend. The sampling
  settings are the trainer's (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`,
  `max_completion_length`). One process only: the rollouts of all processes would have to be gathered as TRL's
  server mode does.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "RuleRun",
    "truncated_student",
    "prompt_dataset",
    "heldout_set",
    "heldout_divergence",
    "share_vllm_generation",
    "StepRecorder",
    "train_rule",
    "plot_rule_runs",
    "memory_bytes",
    "text_prompt_dataset",
    "ServerRollouts",
    "plot_server_rollout_run",
    "greedy_completion",
]

_SUBJECTS = (
    "the ocean", "a mountain village", "the moon", "an old library", "a busy market", "autumn leaves",
    "a river at night", "a small robot", "the first snow", "a lighthouse", "a desert road", "a garden",
    "a train station", "a thunderstorm", "a quiet forest", "a city bridge", "a paper boat", "the northern lights",
    "a bakery", "a sailing ship", "a cat on a roof", "a winter morning", "a kite", "the stars",
)
_TASKS = (
    "Write one sentence about {}.",
    "Describe {} in a few words.",
    "Give a short fact about {}.",
    "Write a two-line poem about {}.",
    "What do you think of when you hear about {}?",
    "Explain to a child what {} is.",
)


def truncated_student(teacher_path: str | os.PathLike, out_dir: str | os.PathLike, num_layers: int = 2) -> Path:
    """Save the teacher's first `num_layers` decoder layers (plus embeddings, final norm, head) as a new model.

    Returns the folder (weights + tokenizer, float32). Raises ValueError if `num_layers` is not in [1, teacher depth).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(teacher_path)
    depth = config.num_hidden_layers
    if not (isinstance(num_layers, int) and 1 <= num_layers < depth):
        raise ValueError(
            f"num_layers must be an int in [1, {depth}) (the teacher has {depth} layers), got {num_layers!r}."
        )
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not missing, missing  # every student weight comes from the teacher
    assert all(".layers." in k for k in unexpected), unexpected  # only the dropped layers are left over
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    student.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher_path).save_pretrained(tmp)
    tmp.rename(out)
    return out


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pairs = [(t, s) for t in _TASKS for s in _SUBJECTS]
    rng.shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"n must be <= {len(pairs)} (distinct prompts available), got {n}.")
    return [t.format(s) for t, s in pairs[:n]]


def text_prompt_dataset(prompts: Sequence[str]):
    """A standard (not conversational) `datasets.Dataset` of `prompts` used as given: for prompts that already carry
    the chat template (TRL tokenises them as they are)."""
    from datasets import Dataset

    if not prompts:
        raise ValueError("prompts must not be empty.")
    return Dataset.from_list([{"prompt": p} for p in prompts])


def prompt_dataset(n: int, seed: int = 0, heldout: int = 0):
    """`(train, heldout_prompts)`: a conversational `datasets.Dataset` of `n` prompts and `heldout` other prompts.

    The two sets never share a prompt (one shuffled pool, split).
    """
    from datasets import Dataset

    texts = _prompts(n + heldout, seed)
    train = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts[:n]])
    return train, texts[n:]


@dataclass
class HeldoutSet:
    """Held-out prompts, chat template applied and left-padded: `input_ids`/`attention_mask` (B, P). The student
    answers them greedily (`max_new_tokens`) every time the divergence is measured."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    pad_token_id: int
    eos_token_id: int


def heldout_set(tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, chat: bool = True) -> HeldoutSet:
    """Tokenise held-out `prompts`, left-padded: as chat turns (generation prompt added) if `chat`, else as given
    (prompts that already carry the chat template, e.g. the long-context suite's)."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return HeldoutSet(batch.input_ids, batch.attention_mask, max_new_tokens, tokenizer.pad_token_id,
                      tokenizer.eos_token_id)


@torch.no_grad()
def heldout_divergence(student, teacher, heldout: HeldoutSet) -> float:
    """Mean per-token reverse KL(p_student || p_teacher), in nats, over the student's greedy answers to the held-out
    prompts (up to and including the first EOS): the on-policy objective, on prompts never trained on."""
    was_training = student.training
    student.eval()
    try:
        device = next(student.parameters()).device
        ids, mask = heldout.input_ids.to(device), heldout.attention_mask.to(device)
        out = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=heldout.max_new_tokens,
                               do_sample=False, pad_token_id=heldout.pad_token_id)  # (B, P + C)
        completion = out[:, ids.shape[1]:]  # (B, C)
        is_eos = completion == heldout.eos_token_id
        completion_mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).long()  # valid through the first EOS
        kw = dict(input_ids=out, attention_mask=torch.cat([mask, completion_mask], 1))
        c = completion.shape[1]
        s = student(**kw, logits_to_keep=c + 1).logits[:, :-1].float().log_softmax(-1)  # (B, C, V)
        t = teacher(**kw, logits_to_keep=c + 1).logits[:, :-1].float().log_softmax(-1)  # (B, C, V)
    finally:
        student.train(was_training)
    kl = (s.exp() * (s - t)).sum(-1)  # (B, C)
    weights = completion_mask.to(kl.dtype)
    return float((kl * weights).sum() / weights.sum())


@torch.no_grad()
def greedy_completion(model, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """`model`'s greedy completion of one prompt (token ids), through the first EOS (included), as vLLM returns it:
    to check that a server serves the weights the trainer holds."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.tensor([list(prompt_ids)], device=device)  # (1, P)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id)  # (1, P + C)
    finally:
        model.train(was_training)
    completion = out[0, ids.shape[1]:].tolist()
    return completion[: completion.index(eos_token_id) + 1] if eos_token_id in completion else completion


def memory_bytes() -> int:
    """Peak accelerator memory allocated (CUDA), else the process's current resident set size (CPU)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reload_sync(generation):
    """A `sync_weights` for a colocated engine that goes through vLLM's in-place `reload_weights`.

    TRL 1.16 (tested against vLLM <= 0.31) pushes weights with `model.load_weights`, one parameter at a time. On
    vLLM 0.32's CPU build that fails at the first fused projection with "AttributeError: 'Parameter' object has no
    attribute 'weight_loader'": the CPU linear layers repack their weights after loading, and the repacked
    parameters have no loader. `model_runner.reload_weights` (vLLM's layerwise reload, which the CPU runner
    inherits) restores the checkpoint layout, loads and re-runs the post-load processing, so it works on every
    platform.
    """

    def sync_weights():
        runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
        weights = [(name, param.detach()) for name, param in generation._iter_named_params()]
        runner.reload_weights(weights_iterator=iter(weights))
        generation.llm.reset_prefix_cache()

    return sync_weights


def use_reload_weight_sync(trainer) -> None:
    """Make `trainer`'s colocated vLLM engine take weight updates through vLLM's `reload_weights` (see
    `_reload_sync`); a no-op unless the trainer generates with a colocated engine on a single process."""
    if not getattr(trainer, "use_vllm", False) or trainer.vllm_mode != "colocate":
        return
    if trainer.accelerator.num_processes != 1:
        raise NotImplementedError("use_reload_weight_sync covers one process (no FSDP/DeepSpeed gathering).")
    generation = trainer.vllm_generation
    generation.sync_weights = _reload_sync(generation)  # instance attribute: TRL's class is left untouched


def share_vllm_generation(trainer, donor) -> None:
    """Let `trainer` (built with `use_vllm=False`) generate with `donor`'s colocated vLLM engine.

    TRL builds one engine per trainer; on a CPU an engine start costs tens of seconds. The engine only holds a copy
    of the student's weights, which TRL overwrites from `trainer.model` before the first rollout (because
    `_last_loaded_step` is reset) and after every optimizer step, so the rollouts are `trainer.model`'s own.
    """
    if not getattr(donor, "use_vllm", False) or donor.vllm_mode != "colocate":
        raise ValueError("donor must be a trainer built with use_vllm=True and vllm_mode='colocate'.")
    if trainer.args.use_vllm:
        raise ValueError("trainer must be built with use_vllm=False (it would start its own engine otherwise).")
    generation = donor.vllm_generation
    generation.model = trainer.model  # _iter_named_params reads the weights from here
    generation.accelerator = trainer.accelerator
    generation._weight_metadata = None
    trainer.vllm_generation = generation
    trainer.use_vllm = True
    trainer.vllm_mode = "colocate"
    trainer._last_loaded_step = -1


class ServerRollouts:
    """TRL's `vllm_generation` interface (`sync_weights`, `generate`) served by an external server.

    `server` needs `complete_ids(prompt_ids, max_tokens, temperature=, top_p=, top_k=, min_p=, repetition_penalty=)`
    and `reload_weights(folder)`. `attach(trainer)` plugs it into a TRL `DistillationTrainer` (or `TIPTrainer`) built
    with `use_vllm=False`. Records, per call: rollout seconds, prompt and completion tokens; per sync: seconds to
    save the student and to reload it in the server.
    """

    def __init__(self, server, weights_dir: str | os.PathLike):
        self.server = server
        self.weights_dir = Path(weights_dir)
        self.trainer = None
        self.rollout_seconds: list[float] = []
        self.prompt_tokens: list[int] = []
        self.completion_tokens: list[int] = []
        self.save_seconds: list[float] = []
        self.reload_seconds: list[float] = []

    def attach(self, trainer) -> "ServerRollouts":
        if trainer.args.use_vllm:
            raise ValueError("build the trainer with use_vllm=False: it would start its own vLLM engine otherwise.")
        if trainer.accelerator.num_processes != 1:
            raise NotImplementedError("ServerRollouts covers one training process (rollouts are not gathered).")
        if hasattr(trainer.model, "peft_config"):
            raise NotImplementedError("ServerRollouts syncs full checkpoints; merge a PEFT student's adapters first "
                                      "(save_pretrained would write the adapter only).")
        self.trainer = trainer
        trainer.vllm_generation = self
        trainer.use_vllm = True
        trainer.vllm_mode = "server"
        trainer._last_loaded_step = -1  # TRL syncs before the first rollout
        return self

    def sync_weights(self) -> None:
        """Save the trainer's student into `weights_dir` and have the server load it in place."""
        start = time.perf_counter()
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        model.save_pretrained(self.weights_dir)
        self.save_seconds.append(time.perf_counter() - start)
        self.reload_seconds.append(self.server.reload_weights(self.weights_dir))

    def generate(self, prompts, images=None, num_generations: int = 1, profiler=None):
        """TRL's `VLLMGeneration.generate` contract: `(prompt_ids, completion_ids, logprobs, logprob_token_ids)`;
        logprobs are not requested (distillation scores with the teacher)."""
        if images is not None and any(i is not None for i in images):
            raise NotImplementedError("ServerRollouts sends token ids only (no images).")
        if num_generations != 1:
            raise NotImplementedError(f"num_generations must be 1 for distillation, got {num_generations}.")
        args = self.trainer.args
        start = time.perf_counter()
        with profiler or contextlib.nullcontext():  # TRL's "vLLM.generate" profiling context
            completion_ids = self.server.complete_ids(
                prompts,
                max_tokens=args.max_completion_length,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                min_p=args.min_p,
                repetition_penalty=args.repetition_penalty,
            )
        self.rollout_seconds.append(time.perf_counter() - start)
        self.prompt_tokens.append(sum(len(p) for p in prompts))
        self.completion_tokens.append(sum(len(c) for c in completion_ids))
        return [list(p) for p in prompts], completion_ids, None, None


@dataclass
class RuleRun:
    """One rule's training run: per-step logs, held-out divergence before and after, step times and memory."""

    rule: str
    ratio: float
    logs: list[dict] = field(default_factory=list)
    divergence: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out reverse KL)
    step_seconds: list[float] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "all" if self.rule == "all" else f"{self.rule} {self.ratio:g}"

    @property
    def divergence_before(self) -> float:
        return self.divergence[0][1]

    @property
    def divergence_after(self) -> float:
        return self.divergence[-1][1]


class StepRecorder:
    """A `TrainerCallback` that records step wall time, memory and (every `eval_every` steps) held-out divergence."""

    def __new__(cls, *args, **kwargs):
        from transformers import TrainerCallback

        # Subclass lazily so importing this module does not import transformers' trainer.
        class _Recorder(TrainerCallback):
            def __init__(self, run: RuleRun, teacher, heldout: HeldoutSet, eval_every: int):
                self.run, self.teacher, self.heldout, self.eval_every = run, teacher, heldout, eval_every
                self._t0 = None

            def on_step_begin(self, args, state, control, model=None, **kw):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, **kw):
                self.run.step_seconds.append(time.perf_counter() - self._t0)
                self.run.memory.append(memory_bytes())
                if self.eval_every and state.global_step % self.eval_every == 0:
                    self.run.divergence.append((state.global_step, heldout_divergence(model, self.teacher, self.heldout)))

        return _Recorder(*args, **kwargs)


def train_rule(
    rule: str,
    ratio: float,
    student_path: str | os.PathLike,
    teacher,
    tokenizer,
    train_dataset,
    heldout: HeldoutSet,
    output_dir: str | os.PathLike,
    vllm_donor=None,
    use_vllm: bool = True,
    rollouts: ServerRollouts | None = None,
    eval_every: int = 0,
    train_embeddings: bool = False,
    **config_kwargs: Any,
):
    """Train a fresh copy of the student with `TIPTrainer` under one selection rule; returns `(RuleRun, trainer)`.

    `config_kwargs` go to `TIPConfig` (steps, batch size, learning rate, completion length, seed...). With
    `use_vllm=True` the rollouts come from TRL's colocated vLLM engine: a new one, or `vllm_donor`'s (another
    trainer from this function) when given. With `rollouts` (a `ServerRollouts`) they come from its server instead,
    synced with the student every step (`use_vllm` and `vllm_donor` are then ignored). The held-out divergence is
    measured before training and at the end (and every `eval_every` steps if > 0). `train_embeddings=False` freezes
    the (tied) embedding/head matrix the truncated student shares with the teacher, so only its decoder layers and
    final norm train.
    """
    from transformers import AutoModelForCausalLM

    from .config import TIPConfig
    from .trainer import TIPTrainer

    own_engine = use_vllm and vllm_donor is None and rollouts is None
    args = TIPConfig(
        str(output_dir),
        selection_rule=rule,
        selection_ratio=ratio,
        use_vllm=own_engine,
        vllm_mode="colocate",
        **config_kwargs,
    )
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    if not train_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    run = RuleRun(rule, ratio)
    run.divergence.append((0, heldout_divergence(student, teacher, heldout)))
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[StepRecorder(run, teacher, heldout, eval_every)],
    )
    if rollouts is not None:
        rollouts.attach(trainer)
    elif use_vllm and vllm_donor is not None:
        share_vllm_generation(trainer, vllm_donor)
    use_reload_weight_sync(trainer)
    trainer.train()
    run.logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    if not run.divergence or run.divergence[-1][0] != trainer.state.global_step:
        run.divergence.append((trainer.state.global_step, heldout_divergence(trainer.model, teacher, heldout)))
    return run, trainer


def plot_rule_runs(runs: Sequence[RuleRun], path: str | os.PathLike | None = None):
    """Four panels: training loss, quadrant shares over steps (one line style per rule), held-out divergence per
    rule, and step time / memory. Saves a PNG at `path` (small: 100 dpi) when given; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    ax = axes[0]
    for r in runs:
        ax.plot([e["step"] for e in r.logs], [e["loss"] for e in r.logs], marker="o", ms=3, label=r.label)
    ax.set(title="training loss (selected tokens)", xlabel="step")
    ax.legend(fontsize=8)

    ax = axes[1]
    colors = {"q1": "tab:blue", "q2": "tab:orange", "q3": "tab:red", "q4": "tab:gray"}
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(runs):
        steps = [e["step"] for e in r.logs]
        for q, c in colors.items():
            ax.plot(steps, [e.get(f"tip/share_{q}", math.nan) for e in r.logs], styles[i % 4], color=c,
                    label=q if i == 0 else None)
    ax.set(title="token-type shares (" + ", ".join(f"{styles[i % 4]} {r.label}" for i, r in enumerate(runs)) + ")",
           xlabel="step", ylim=(0, 1))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)

    ax = axes[2]
    for r in runs:
        ax.plot([s for s, _ in r.divergence], [d for _, d in r.divergence], marker="o", label=r.label)
    ax.set(title="held-out KL(student || teacher), nats/token", xlabel="step")
    ax.legend(fontsize=8)

    ax = axes[3]
    labels = [r.label for r in runs]
    times = [sum(r.step_seconds[1:]) / max(1, len(r.step_seconds) - 1) for r in runs]
    ax.bar(labels, times, color="tab:blue")
    ax.set(title="mean step time (s, after step 1) / memory (GiB)", ylabel="s")
    ax2 = ax.twinx()
    ax2.plot(labels, [max(r.memory) / 2**30 for r in runs], "o", color="tab:red")
    ax2.set_ylabel("GiB (CUDA peak, or CPU RSS)", color="tab:red")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    return fig


def plot_server_rollout_run(run: RuleRun, rollouts: ServerRollouts, counters: dict,
                            path: str | os.PathLike | None = None):
    """Three panels for the long-rollouts recipe: training loss and held-out divergence over steps; where each step's
    time goes (server rollouts, weight sync, the rest of the step: teacher and student passes, optimizer); what the
    server's decode steps read (tokens per kv head and layer, from its asynctls counters) against the context they
    attend over. Saves a PNG at `path` when given; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    ax.plot([e["step"] for e in run.logs], [e["loss"] for e in run.logs], "o-", ms=3, label=f"loss ({run.label})")
    ax.set(title="TIP training on server rollouts", xlabel="step", ylabel="loss (selected tokens)")
    ax2 = ax.twinx()
    ax2.plot([s for s, _ in run.divergence], [d for _, d in run.divergence], "s--", color="tab:red",
             label="held-out KL")
    ax2.set_ylabel("held-out KL(student || teacher), nats/token", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)

    ax = axes[1]
    steps = range(1, len(run.step_seconds) + 1)
    n = len(run.step_seconds)
    rollout = rollouts.rollout_seconds[:n]
    sync = [a + b for a, b in zip(rollouts.save_seconds, rollouts.reload_seconds)][:n]
    rest = [max(0.0, t - r - y) for t, r, y in zip(run.step_seconds, rollout, sync)]
    ax.bar(steps, rollout, label="rollouts (asynctls server)", color="tab:blue")
    ax.bar(steps, sync, bottom=rollout, label="weight sync (save + reload)", color="tab:orange")
    ax.bar(steps, rest, bottom=[a + b for a, b in zip(rollout, sync)], label="teacher + student passes, optimizer",
           color="tab:gray")
    ax.set(title="where a step's time goes", xlabel="step", ylabel="s")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)

    ax = axes[2]
    read, context = counters["tokens_read_per_sparse_decode"], counters["context_per_sparse_decode"]
    if read is None:  # the serving backend did not count reads (the GPU backend's graph-captured decode)
        ax.bar(["dense (context)"], [context], color=["tab:gray"])
        ax.text(0.5, 0.9, "asynctls reads not counted on this backend", transform=ax.transAxes, ha="center", fontsize=8)
    else:
        ax.bar(["asynctls (read)", "dense (context)"], [read, context], color=["tab:blue", "tab:gray"])
    ax.set(title=f"per decode step, kv head, layer ({counters['decode_tokens_sparse']} sparse decode tokens)",
           ylabel="tokens")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    return fig
