"""TIPTrainer across processes (DDP or FSDP): one real training step on fixed completions, dumped for comparison.

Run once with one process and once with two on the same four prompts; `tests/test_multiprocess.py` compares the
dumps. On a CPU machine the two processes come from `accelerate launch --multi_gpu --num_processes 2` (DDP over
gloo), `accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2` (FSDP2 over gloo) or `torchrun
--nproc_per_node 2`: with `--cpu`, accelerate 1.x's launcher starts a single process (it spreads over CPU processes
only through mpirun with a hostfile), and the script's `PartialState(cpu=True)` turns the torch.distributed launch
into a gloo group. FSDP on CPU: accelerate 1.15 keeps a gloo group DDP even under `--use_fsdp` (its FSDP type is
reached from GPU-like types only), so the script relabels it (`_allow_fsdp_on_cpu`); FSDP1's plugin refuses a CPU
outright ("There are currently no available devices found, must be one of 'XPU', 'CUDA', ..."), so on CPU only FSDP2
runs. With `--device cuda` the same launches run on GPUs (nccl) and each process records its peak GPU memory. What
the comparison shows:

- Loss normalisation. TIPTrainer divides the selected-token divergence by the selected-token count of the whole
  generation batch over every process (`num_items_in_batch`, as TRL's own count), and TRL divides that by the
  process count to undo the gradient averaging of DDP's all-reduce (or FSDP's reduce-scatter). So the gradient
  after the reduction, with 2 processes and gradient accumulation, must equal the single-process gradient on the
  union batch, and the logged loss and the updated weights too.
- Selection per rank. Each process selects on its own rollouts only: every selection call sees the rank's
  micro-batch, and with a rule that ranks inside each rollout (`divergence`) the positions chosen per rollout
  are the single-process ones.
- Metrics reduction. The quadrant counts are gathered over processes before logging, so with fixed type
  thresholds and no gradient accumulation the logged shares equal the single-process shares. (With accumulation
  the logged value is the mean over micro-batches of each micro-batch's all-process share, as TRL logs its own
  `entropy`: it differs from a share over the union batch.)
- Under FSDP, the student's parameters are sharded (each process holds about 1/P of them) and read full only
  inside the forward; the `lm_head` reaches the selected-row projections whole (`trl_tip.loss._full_tensor`).
  The teacher is kept whole on every process and on the student's device, with process 0's weights
  (`trl_tip.trainer._place_teacher_under_fsdp`).

Generation is replaced by a fixed completion per prompt (a function of the prompt's token ids), so everything
downstream of generation is TRL's and TIP's real code path: sampler, batch split, `num_items_in_batch`, DDP/FSDP,
gradient accumulation, `training_step`, logging. The gradient is read in `on_pre_optimizer_step`, after the
reduction and before the optimizer touches it (no clipping: `max_grad_norm=0`); under FSDP each process gathers the
full gradient from the shards.

Run variants, as `LAYOUT:VARIANT` in `--runs`. One must equal the single-process run:
- `head_sharded` (FSDP2): every `nn.Linear`, the `lm_head` included, in an FSDP unit of its own, so the head reaches
  the selected-row projections as a sharded DTensor whose unit's forward never runs (`trl_tip.loss._full_tensor`
  gathers it and reduce-scatters its gradient).
And these must differ (the comparison's teeth):
- `local_normaliser`: each process divides by its own selected-token count instead of the all-process count.
- `unsynced_teacher`: TIPTrainer's start-up broadcast of the teacher is skipped. Under FSDP with accelerate's
  default CPU-RAM-efficient loading, transformers gives every process but the first an all-zero teacher.
- `replicated_head_grad` (FSDP2): `head_sharded` with TRL 1.16's gather (`full_tensor()`, gradient taken as
  replicated): each shard of the head's gradient keeps its own process's contribution only.

Usage:
    python benchmarks/tip_multiprocess_check.py --out /tmp/tip_mp --runs 4x1,2x2
    accelerate launch --multi_gpu --num_processes 2 benchmarks/tip_multiprocess_check.py --out /tmp/tip_mp \
        --runs 2x1,1x2
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
        --fsdp_transformer_layer_cls_to_wrap Qwen3DecoderLayer benchmarks/tip_multiprocess_check.py \
        --out /tmp/tip_mp \
        --runs 2x1,1x2,2x1:head_sharded,2x1:local_normaliser,2x1:unsynced_teacher,2x1:replicated_head_grad
    python benchmarks/tip_multiprocess_check.py --compare --out /tmp/tip_mp   # every dump against 1proc_4x1

On 2 GPUs: `bash benchmarks/run_gpu_tip_multiprocess.sh [tiny|qwen3-0.6b/1.7b]` runs the three commands with
`--device cuda` (nccl) and the comparison; each summary.json then holds every process's peak GPU memory
(`per_rank[*].peak_allocated_gib`: the training step's peak, without this script's own gathers) and where the
teacher sits. `--shapes qwen3-0.6b/1.7b` builds random models with Qwen3-0.6B/1.7B shapes and the real
vocabulary, for memory numbers that mean something (the teacher stays whole on every process, as in TRL).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (with --device cuda)
warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
NUM_PROMPTS = 4


def fixed_completions(prompt_ids: list[list[int]], vocab: int) -> list[list[int]]:
    """A completion per prompt that depends only on the prompt's ids (lengths 4..9, so padding varies)."""
    import torch

    out = []
    for ids in prompt_ids:
        key = sum((i + 1) * t for i, t in enumerate(ids))
        g = torch.Generator().manual_seed(key)
        length = 4 + key % 6
        out.append(torch.randint(10, vocab, (length,), generator=g).tolist())
    return out


class _Recorder:
    """Wraps `TIPTrainer._compute_loss` to record, per rollout of this rank, the positions the rule selected."""

    def __init__(self, rank: int):
        import torch

        import trl_tip.trainer as tip_trainer
        from trl_tip import TIPTrainer

        self.rank, self.selections, self._last, self._head_sharded = rank, [], None, None
        original_loss, original_compute = tip_trainer.selected_chunked_loss, TIPTrainer._compute_loss
        recorder = self

        def recording_loss(*a, **k):
            result = original_loss(*a, **k)
            recorder._last = result.selected  # (B, C) bool
            recorder._head_sharded = isinstance(a[2][0], torch.distributed.tensor.DTensor)  # student (weight, bias)
            return result

        def recording_compute(trainer, unwrapped_student, inputs, num_items_in_batch):
            out = original_compute(trainer, unwrapped_student, inputs, num_items_in_batch)
            selected, mask = recorder._last, inputs["completion_mask"].bool()
            for row in range(mask.shape[0]):
                recorder.selections.append(
                    {
                        "rank": recorder.rank,
                        "micro_batch_rollouts": int(mask.shape[0]),
                        "completion": inputs["completion_ids"][row][mask[row]].tolist(),
                        "selected": selected[row][mask[row]].nonzero().squeeze(-1).tolist(),
                        "num_items_in_batch": float(num_items_in_batch),
                        "student_head_reached_loss_sharded": recorder._head_sharded,
                    }
                )
            return out

        tip_trainer.selected_chunked_loss = recording_loss
        TIPTrainer._compute_loss = recording_compute


# Runs that must equal the single-process one besides the plain layouts: under FSDP2, every `nn.Linear` (the
# `lm_head` included) in an FSDP unit of its own, so the head reaches the loss as a sharded DTensor.
EQUAL_VARIANTS = ("head_sharded",)
# Runs that must differ (see the module docstring).
DIFFERENT_VARIANTS = ("local_normaliser", "unsynced_teacher", "replicated_head_grad")
VARIANTS = EQUAL_VARIANTS + DIFFERENT_VARIANTS

# Model shapes for `--shapes` (random weights, std 0.02, the tiny tokenizer; the vocabulary is the real one, so the
# `lm_head` and the chunked loss cost what they cost on the real models). `tiny` is the tests' pair.
_QWEN3 = dict(max_position_embeddings=4096, rope_theta=1_000_000.0, vocab_size=151936)
SHAPES = {
    # (student, teacher) config fields
    "qwen3-0.6b/1.7b": (
        dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
        dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    ),
    # The same vocabulary and tied embeddings at toy width: exercises the preset path on a CPU in seconds.
    "toy-151k": (
        dict(_QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
        dict(_QWEN3, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=48, tie_word_embeddings=False),
    ),
}  # fmt: skip


def build_shaped_pair(name: str, cache: str) -> tuple[str, str]:
    """(teacher, student) folders of the `SHAPES[name]` pair, built once under `cache` (call on one process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    folders = []
    for role, fields, seed in (("teacher", SHAPES[name][1], 1), ("student", SHAPES[name][0], 2)):
        folder = Path(cache) / f"{name.replace('/', '_')}-{role}"
        if not (folder / "config.json").exists():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tokenizer = tiny_models.build_tokenizer(tmp)
            config = AutoConfig.for_model(
                "qwen3",
                initializer_range=0.02,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **fields,
            )
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(tmp))
            tmp.rename(folder)
        folders.append(str(folder))
    return folders[0], folders[1]


def distributed_mode(num_processes: int) -> str:
    """`single`, `ddp` or `fsdp<version>`, from the launcher's environment (accelerate sets ACCELERATE_USE_FSDP)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp" + os.environ.get("FSDP_VERSION", "1")
    return "ddp" if num_processes > 1 else "single"


def _full(tensor):
    # Under FSDP2 parameters and their gradients are DTensors sharded over the processes: gather (a collective).
    import torch

    return tensor.full_tensor() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor


def _flat_parameters(model, grads: bool):
    """Every parameter (or its gradient) of the student, full, flattened in `model.parameters()` order."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    def collect(params):
        out = []
        for p in params:
            t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach()
            out.append(_full(t).reshape(-1))
        return torch.cat(out).clone()

    if isinstance(model, FullyShardedDataParallel):  # FSDP1: summon the full (unflattened) parameters
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, with_grads=grads):
            return collect(model.module.parameters())
    return collect(model.parameters())


def _sharding(trainer, full_numel: int) -> dict:
    """How the student is held on this process: its wrapper and the share of its parameters stored locally."""
    import torch
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    model, wrapped = trainer.model, trainer.model_wrapped
    if isinstance(wrapped, FullyShardedDataParallel):
        kind, local = "fsdp1", sum(p.numel() for p in wrapped.parameters())  # with use_orig_params: views of the shard
    else:
        kind = "fsdp2" if isinstance(model, FSDPModule) else type(wrapped).__name__
        local = sum(
            (p.to_local() if isinstance(p, torch.distributed.tensor.DTensor) else p).numel() for p in model.parameters()
        )
    teacher_device = next(trainer.accelerator.unwrap_model(trainer.teacher_model).parameters()).device
    return {"student_wrapper": kind, "student_local_share": local / full_numel, "teacher_device": str(teacher_device)}


class _PeakMemory:
    """Peak GPU memory of the training step, leaving out what this script's own gathers allocate.

    Read before the gradient probe gathers the full gradient (model load, forward, backward, reduction) and again
    after the optimizer step (AdamW allocates its states there), with the statistics reset in between.
    """

    def __init__(self, device: str):
        import torch

        self.cuda, self.peaks = device == "cuda", []
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def read(self, reset: bool = False) -> None:
        import torch

        if self.cuda:
            self.peaks.append((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()))
            if reset:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

    def summary(self) -> dict:
        import resource

        import torch

        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.cuda:
            out["peak_allocated_gib"] = max(p[0] for p in self.peaks) / 2**30
            out["peak_reserved_gib"] = max(p[1] for p in self.peaks) / 2**30
            out["gpu"] = torch.cuda.get_device_name()
        return out


def _allow_fsdp_on_cpu(state) -> None:
    """Let accelerate's FSDP plugin take a gloo (CPU) process group.

    accelerate 1.15's `AcceleratorState` turns a launch into `DistributedType.FSDP` only from a GPU-like type
    (MULTI_GPU, MULTI_XPU, ...): a MULTI_CPU group silently stays DDP although `--use_fsdp` was given (the model
    comes back as `DistributedDataParallel`). torch's FSDP itself runs on CPU over gloo, so for this check the shared
    state is relabelled before the Trainer builds its Accelerator (which it keeps, with `use_configured_state`);
    device and backend stay cpu/gloo.
    """
    from accelerate.utils import DistributedType

    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


def run_one(args, state, recorder: _Recorder, per_device: int, grad_accum: int, variant: str | None) -> dict:
    """One training step over the 4 prompts with this layout; returns what rank 0 dumps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import trl_tip.loss as tip_loss
    import trl_tip.trainer as tip_trainer
    from trl_tip import TIPConfig, TIPTrainer
    from trl_tip.selection import selection_counts

    gc.collect()  # the previous run's trainer and models
    peak_memory = _PeakMemory(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"the blue river {i} city " * (1 + i)}]} for i in range(NUM_PROMPTS)]
    )
    config = TIPConfig(
        os.path.join(args.out, "trainer"),
        bf16=False,
        use_cpu=args.device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        max_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        max_completion_length=12,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: the callback reads the raw reduced gradient
        beta=args.beta,
        selection_rule=args.rule,
        selection_ratio=args.ratio,
        entropy_threshold=0.4,  # fixed type boundaries: the quadrant counts are per token, not per batch
        divergence_threshold=12.0,
        disable_tqdm=True,
        # Keep the process group `main` configured (TrainingArguments would otherwise reset and rebuild it).
        accelerator_config={"use_configured_state": True},
    )
    broadcast = tip_trainer._broadcast_from_main_process
    if variant == "unsynced_teacher":
        tip_trainer._broadcast_from_main_process = lambda model: None
    try:
        trainer = TIPTrainer(
            model=AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32),
            teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    finally:
        tip_trainer._broadcast_from_main_process = broadcast
    vocab = len(tokenizer)
    trainer._generate_single_turn = lambda prompt_ids, *a, **k: fixed_completions(prompt_ids, vocab)
    restore = []
    if variant in ("head_sharded", "replicated_head_grad"):
        if not trainer.accelerator.is_fsdp2:
            raise ValueError(f"Run variant {variant!r} needs an FSDP2 launch (`--use_fsdp --fsdp_version 2`).")
        # The plugin wraps at `accelerator.prepare` (inside `train`): add `Linear` to its transformer classes for
        # this run only (the plugin is shared by every run of the process).
        plugin = trainer.accelerator.state.fsdp_plugin
        names = plugin.transformer_cls_names_to_wrap
        plugin.transformer_cls_names_to_wrap = [*(names or []), "Linear"]
        restore.append(lambda: setattr(plugin, "transformer_cls_names_to_wrap", names))
    if variant == "replicated_head_grad":
        # TRL 1.16's gather (`full_tensor()` with a replicated gradient) instead of `trl_tip.loss._full_tensor`'s.
        full_tensor = tip_loss._full_tensor

        def replicated(weight, dtype=None):
            if isinstance(weight, torch.distributed.tensor.DTensor):
                weight = weight.full_tensor()
                return weight if dtype is None else weight.to(dtype)
            return weight

        tip_loss._full_tensor = replicated
        restore.append(lambda: setattr(tip_loss, "_full_tensor", full_tensor))
    if variant == "local_normaliser":
        generate_and_score = trainer._generate_and_score_completions

        def local_count(inputs):
            output = generate_and_score(inputs)
            local = selection_counts(output["completion_mask"], trainer.selection_ratio, trainer.selection_rule).sum()
            output["num_items_in_batch"] = local.to(output["num_items_in_batch"])
            return output

        trainer._generate_and_score_completions = local_count
    grads: dict = {}

    class GradientProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args_, state_, control, **kwargs):
            # DDP shares the parameters with the unwrapped model: after the sync step they hold the averaged grad.
            # FSDP holds the averaged grad sharded: every process gathers the full one.
            peak_memory.read()
            grads["flat"] = _flat_parameters(trainer.model_wrapped, grads=True).cpu()
            peak_memory.read(reset=True)  # (the gather's own peak is left out: this restarts the count)

        def on_step_end(self, args_, state_, control, **kwargs):
            peak_memory.read()

    trainer.add_callback(GradientProbe())
    recorder.selections.clear()
    try:
        trainer.train()
    finally:
        for undo in restore:
            undo()

    flat = grads["flat"]
    weights = _flat_parameters(trainer.model_wrapped, grads=False).cpu()
    sharding, memory = _sharding(trainer, weights.numel()), peak_memory.summary()
    if state.num_processes > 1:
        selections = [None] * state.num_processes
        torch.distributed.all_gather_object(selections, list(recorder.selections))
        per_rank = [None] * state.num_processes
        torch.distributed.all_gather_object(per_rank, {**sharding, **memory})
        flat_here = flat.to(state.device)  # nccl gathers device tensors
        copies = [torch.zeros_like(flat_here) for _ in range(state.num_processes)]
        torch.distributed.all_gather(copies, flat_here)
        ranks_agree = all(torch.equal(c, copies[0]) for c in copies)
    else:
        selections, per_rank, ranks_agree = [list(recorder.selections)], [{**sharding, **memory}], True
    logs = trainer.state.log_history[0]
    return {
        "layout": f"{state.num_processes} process(es), per_device {per_device}, grad_accum {grad_accum}",
        "processes": state.num_processes,
        "mode": distributed_mode(state.num_processes),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "device": args.device,
        "variant": variant,
        "rule": args.rule,
        "loss": logs["loss"],
        "grad_norm": float(flat.norm()),
        "ranks_agree_on_gradient": ranks_agree,
        "per_rank": per_rank,
        "logs": {k: v for k, v in logs.items() if isinstance(v, (int, float))},
        "selections": [s for rank in selections for s in rank],
        "gradient": flat,
        "weights": weights,
    }


def run_folder(num_processes: int, mode: str, layout: str, variant: str | None) -> str:
    """Dump folder name: `<P>proc_<layout>` for one process or DDP, `<P>proc_<mode>_<layout>` otherwise."""
    name = f"{num_processes}proc_{layout}" if mode in ("single", "ddp") else f"{num_processes}proc_{mode}_{layout}"
    return name if variant is None else f"{name}_{variant}"


def compare(out: Path, reference: str = "1proc_4x1") -> list[dict]:
    """Every dump under `out` against the single-process full-batch one: loss, gradient, weights, peak memory."""
    import torch

    def load(folder):
        return (
            json.loads((folder / "summary.json").read_text()),
            torch.load(folder / "grad.pt"),
            torch.load(folder / "weights.pt"),
        )

    ref, ref_grad, ref_weights = load(out / reference)
    rows = []
    for folder in sorted(p for p in out.iterdir() if (p / "summary.json").exists()):
        summary, grad, weights = load(folder)
        rows.append(
            {
                "run": folder.name,
                "device": summary.get("device"),
                "loss": summary["loss"],
                "loss_rel_diff": abs(summary["loss"] - ref["loss"]) / abs(ref["loss"]),
                "grad_max_abs_diff": float((grad - ref_grad).abs().max()),
                "grad_rel_norm_diff": float((grad - ref_grad).norm() / ref_grad.norm()),
                "weights_max_abs_diff": float((weights - ref_weights).abs().max()),
                "student_wrapper": [r["student_wrapper"] for r in summary["per_rank"]],
                "student_local_share": [round(r["student_local_share"], 4) for r in summary["per_rank"]],
                "teacher_device": [r.get("teacher_device") for r in summary["per_rank"]],
                "peak_allocated_gib": [r.get("peak_allocated_gib") for r in summary["per_rank"]],  # None on CPU
                "peak_rss_mib": [round(r["peak_rss_mib"]) for r in summary["per_rank"]],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the dumps (rank 0 writes one folder per run)")
    parser.add_argument("--teacher", help="teacher folder (default: build the tiny teacher under --cache)")
    parser.add_argument("--student", help="student folder (default: build the tiny student under --cache)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "asynctls_tip_tiny"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--rule", default="divergence")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument(
        "--shapes",
        choices=("tiny", *SHAPES),
        default="tiny",
        help="model pair when --teacher/--student are not given: the tests' tiny pair, or random models of these "
        "shapes with the real vocabulary, built under --cache",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="no training: print every dump under --out against 1proc_4x1 (JSON lines) and write compare.json there",
    )
    parser.add_argument(
        "--runs",
        help="comma-separated PER_DEVICExGRAD_ACCUM[:VARIANT] layouts run one after the other, e.g. "
        f"`4x1,2x2`; each must cover the 4 prompts in one step (per_device x processes x grad_accum = 4); VARIANT is "
        f"one of {VARIANTS} (see the module docstring)",
    )
    args = parser.parse_args()
    if args.compare:
        rows = compare(Path(args.out))
        (Path(args.out) / "compare.json").write_text(json.dumps(rows, indent=1))
        for row in rows:
            print(json.dumps(row))
        return
    if not args.runs:
        parser.error("--runs is required (unless --compare)")

    import torch
    from accelerate import PartialState

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
        # Deterministic kernels where torch has them; warn (not fail) where a CUDA op has none.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    # cpu=True as `use_cpu=True` in the config: under a torch.distributed launcher (LOCAL_RANK set) this makes the
    # process group a gloo MULTI_CPU one; created first, this singleton is the one the Trainer uses.
    state = PartialState(cpu=args.device == "cpu")
    if args.device == "cpu" and distributed_mode(state.num_processes).startswith("fsdp"):
        _allow_fsdp_on_cpu(state)
    if args.teacher is None or args.student is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        with state.main_process_first():  # one process builds the cache, the others load it
            if args.shapes == "tiny":
                args.teacher = str(tiny_models.cached_model(tiny_models.QWEN3_TEACHER, args.cache))
                args.student = str(tiny_models.cached_model(tiny_models.QWEN3_STUDENT, args.cache))
            else:
                args.teacher, args.student = build_shaped_pair(args.shapes, args.cache)

    runs = []
    for run in args.runs.split(","):
        layout, _, variant = run.partition(":")
        per_device, grad_accum = (int(x) for x in layout.split("x"))
        if per_device * state.num_processes * grad_accum != NUM_PROMPTS:
            raise ValueError(
                f"per_device x processes x grad_accum must be {NUM_PROMPTS} (one step over the whole dataset), got "
                f"{per_device} x {state.num_processes} x {grad_accum} (--runs {args.runs!r})."
            )
        if variant and variant not in VARIANTS:
            raise ValueError(f"Unknown variant {variant!r} in --runs {args.runs!r}; allowed: {VARIANTS}.")
        runs.append((layout, per_device, grad_accum, variant or None))
    mode = distributed_mode(state.num_processes)
    recorder = _Recorder(state.process_index)
    for layout, per_device, grad_accum, variant in runs:
        result = run_one(args, state, recorder, per_device, grad_accum, variant)
        if state.is_main_process:
            out = Path(args.out) / run_folder(state.num_processes, mode, layout, variant)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(result.pop("gradient"), out / "grad.pt")
            torch.save(result.pop("weights"), out / "weights.pt")
            (out / "summary.json").write_text(json.dumps(result, indent=1))
            keys = ("layout", "mode", "variant", "loss", "grad_norm", "ranks_agree_on_gradient", "per_rank")
            print(json.dumps({k: result[k] for k in keys}))
    state.wait_for_everyone()
    # Without this a rank can abort at interpreter exit ("terminate called without an active exception":
    # the process group's threads still running), failing the launch after the results are written.
    state.destroy_process_group()


if __name__ == "__main__":
    main()
