"""TIPTrainer across processes: one real training step on fixed completions, dumped for comparison.

Run once with one process and once with two (gloo DDP on CPU) on the same four prompts; `tests/test_multiprocess.py`
compares the dumps. On a CPU machine the two processes come from `accelerate launch --multi_gpu --num_processes 2`
(or `torchrun --nproc_per_node 2`): with `--cpu`, accelerate 1.x's launcher starts a single process (it spreads
over CPU processes only through mpirun with a hostfile), and the script's `PartialState(cpu=True)` turns the
torch.distributed launch into a gloo group. What the comparison shows:

- Loss normalisation. TIPTrainer divides the selected-token divergence by the selected-token count of the whole
  generation batch over every process (`num_items_in_batch`, as TRL's own count), and TRL divides that by the
  process count to undo DDP's gradient averaging. So the gradient after DDP's all-reduce, with 2 processes and
  gradient accumulation, must equal the single-process gradient on the union batch, and the logged loss too.
- Selection per rank. Each process selects on its own rollouts only: every selection call sees the rank's
  micro-batch, and with a rule that ranks inside each rollout (`divergence`) the positions chosen per rollout
  are the single-process ones.
- Metrics reduction. The quadrant counts are gathered over processes before logging, so with fixed type
  thresholds and no gradient accumulation the logged shares equal the single-process shares. (With accumulation
  the logged value is the mean over micro-batches of each micro-batch's all-process share, as TRL logs its own
  `entropy`: it differs from a share over the union batch.)

Generation is replaced by a fixed completion per prompt (a function of the prompt's token ids), so everything
downstream of generation is TRL's and TIP's real code path: sampler, batch split, `num_items_in_batch`, DDP,
gradient accumulation, `training_step`, logging. The gradient is read in `on_pre_optimizer_step`, after DDP's
all-reduce and before the optimizer touches it (no clipping: `max_grad_norm=0`).

Usage:
    python benchmarks/tip_multiprocess_check.py --out /tmp/tip_mp --runs 4x1,2x2
    accelerate launch --multi_gpu --num_processes 2 benchmarks/tip_multiprocess_check.py --out /tmp/tip_mp \
        --runs 2x1,1x2
"""

from __future__ import annotations

import argparse
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
        import trl_tip.trainer as tip_trainer
        from trl_tip import TIPTrainer

        self.rank, self.selections, self._last = rank, [], None
        original_loss, original_compute = tip_trainer.selected_chunked_loss, TIPTrainer._compute_loss
        recorder = self

        def recording_loss(*a, **k):
            result = original_loss(*a, **k)
            recorder._last = result.selected  # (B, C) bool
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
                    }
                )
            return out

        tip_trainer.selected_chunked_loss = recording_loss
        TIPTrainer._compute_loss = recording_compute


def run_one(args, state, recorder: _Recorder, per_device: int, grad_accum: int) -> dict:
    """One training step over the 4 prompts with this layout; returns what rank 0 dumps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from trl_tip import TIPConfig, TIPTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"the blue river {i} city " * (1 + i)}]} for i in range(NUM_PROMPTS)]
    )
    config = TIPConfig(
        os.path.join(args.out, "trainer"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        max_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        max_completion_length=12,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: the callback reads the raw all-reduced gradient
        beta=args.beta,
        selection_rule=args.rule,
        selection_ratio=args.ratio,
        entropy_threshold=0.4,  # fixed type boundaries: the quadrant counts are per token, not per batch
        divergence_threshold=12.0,
        disable_tqdm=True,
    )
    trainer = TIPTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    vocab = len(tokenizer)
    trainer._generate_single_turn = lambda prompt_ids, *a, **k: fixed_completions(prompt_ids, vocab)
    grads: dict = {}

    class GradientProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args_, state_, control, **kwargs):
            # DDP shares the parameters with the unwrapped model; after the sync step they hold the averaged grad.
            params = list(trainer.model.parameters())
            grads["flat"] = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
            ).clone()

    trainer.add_callback(GradientProbe())
    recorder.selections.clear()
    trainer.train()

    flat = grads["flat"]
    if state.num_processes > 1:
        selections = [None] * state.num_processes
        torch.distributed.all_gather_object(selections, list(recorder.selections))
        copies = [torch.zeros_like(flat) for _ in range(state.num_processes)]
        torch.distributed.all_gather(copies, flat)
        ranks_agree = all(torch.equal(c, copies[0]) for c in copies)
    else:
        selections, ranks_agree = [list(recorder.selections)], True
    logs = trainer.state.log_history[0]
    return {
        "layout": f"{state.num_processes} process(es), per_device {per_device}, grad_accum {grad_accum}",
        "processes": state.num_processes,
        "rule": args.rule,
        "loss": logs["loss"],
        "grad_norm": float(flat.norm()),
        "ranks_agree_on_gradient": ranks_agree,
        "logs": {k: v for k, v in logs.items() if isinstance(v, (int, float))},
        "selections": [s for rank in selections for s in rank],
        "gradient": flat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the dumps (rank 0 writes <P>proc_<layout>/)")
    parser.add_argument("--teacher", help="teacher folder (default: build the tiny teacher under --cache)")
    parser.add_argument("--student", help="student folder (default: build the tiny student under --cache)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "asynctls_tip_tiny"))
    parser.add_argument("--rule", default="divergence")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument(
        "--runs",
        required=True,
        help="comma-separated PER_DEVICExGRAD_ACCUM layouts run one after the other, e.g. `4x1,2x2`; each must "
        "cover the 4 prompts in one step (per_device x processes x grad_accum = 4)",
    )
    args = parser.parse_args()

    import torch
    from accelerate import PartialState

    torch.use_deterministic_algorithms(True)
    # cpu=True as `use_cpu=True` in the config: under a torch.distributed launcher (LOCAL_RANK set) this makes the
    # process group a gloo MULTI_CPU one; created first, this singleton is the one the Trainer uses.
    state = PartialState(cpu=True)
    if args.teacher is None or args.student is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        with state.main_process_first():  # one process builds the cache, the others load it
            args.teacher = str(tiny_models.cached_model(tiny_models.QWEN3_TEACHER, args.cache))
            args.student = str(tiny_models.cached_model(tiny_models.QWEN3_STUDENT, args.cache))

    layouts = [tuple(int(x) for x in run.split("x")) for run in args.runs.split(",")]
    for per_device, grad_accum in layouts:
        if per_device * state.num_processes * grad_accum != NUM_PROMPTS:
            raise ValueError(
                f"per_device x processes x grad_accum must be {NUM_PROMPTS} (one step over the whole dataset), got "
                f"{per_device} x {state.num_processes} x {grad_accum} (--runs {args.runs!r})."
            )
    recorder = _Recorder(state.process_index)
    for per_device, grad_accum in layouts:
        result = run_one(args, state, recorder, per_device, grad_accum)
        if state.is_main_process:
            out = Path(args.out) / f"{state.num_processes}proc_{per_device}x{grad_accum}"
            out.mkdir(parents=True, exist_ok=True)
            torch.save(result.pop("gradient"), out / "grad.pt")
            (out / "summary.json").write_text(json.dumps(result, indent=1))
            print(json.dumps({k: result[k] for k in ("layout", "loss", "grad_norm", "ranks_agree_on_gradient")}))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
