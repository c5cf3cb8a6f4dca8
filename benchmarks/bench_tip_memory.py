"""Peak memory and time of one distillation loss forward + backward: TIP rules vs TRL's all-token trainers.

Shapes: Qwen3-0.6B student and Qwen3-1.7B teacher (random weights from their configs, bf16, vocabulary 151936),
batch 2, prompt 512 + completion 3584 tokens, and a second row with 8192-token completions. Gradient checkpointing
on. Every case calls the real trainers' `compute_loss` on the same batch and then `backward()`:

- distill: TRL's `DistillationTrainer` (chunked loss, all tokens) and `TIPTrainer` with `all`, `entropy` 0.5,
  `type_aware` 0.5, `q3` 0.1.
- gkd: TRL's experimental `GKDTrainer` (full logits, all tokens) and `TIPGKDTrainer` with the same rules.

Reported per case: peak memory above the weights (`torch.cuda.max_memory_allocated` minus what was allocated before
the step), step time (median of the timed repeats), and for the distill rows the time of the loss part alone
(projections and divergence, forward and backward, from given hidden states). A case that runs out of memory is
recorded as OOM.

    python benchmarks/bench_tip_memory.py --out results.json          # on the GPU
    python benchmarks/bench_tip_memory.py --tiny --out /tmp/tiny.json  # CPU smoke test on the tiny test models
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402

VOCAB = 151936
# Qwen3-0.6B and Qwen3-1.7B (their published config.json values)
STUDENT_CONFIG = dict(
    hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, tie_word_embeddings=True,
)  # fmt: skip
TEACHER_CONFIG = dict(
    hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, tie_word_embeddings=True,
)  # fmt: skip
RULES = [("all", 1.0), ("entropy", 0.5), ("type_aware", 0.5), ("q3", 0.1)]


def build_models(tiny: bool, device: torch.device, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen3Config

    if tiny:
        root = os.environ.get("ASYNCTLS_TIP_TEST_CACHE", tempfile.mkdtemp())
        teacher = tiny_models.cached_model(tiny_models.QWEN3_TEACHER, root)
        student = tiny_models.cached_model(tiny_models.QWEN3_STUDENT, root)
        return (
            AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).to(device),
            AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device),
        )
    models = []
    for spec in (STUDENT_CONFIG, TEACHER_CONFIG):
        config = Qwen3Config(
            vocab_size=VOCAB, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **spec,
        )  # fmt: skip
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        models.append(model)
    return models


def make_trainer(kind: str, rule: str | None, ratio: float, student, teacher, tokenizer, tiny: bool, workdir: str):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_tip import TIPConfig, TIPGKDConfig, TIPGKDTrainer, TIPTrainer

    common = dict(
        report_to="none", save_strategy="no", gradient_checkpointing=True, bf16=not tiny, use_cpu=tiny,
        per_device_train_batch_size=2, beta=1.0,
    )  # fmt: skip
    selection = {} if rule is None else dict(selection_rule=rule, selection_ratio=ratio)
    if kind == "distill":
        dataset = Dataset.from_list([{"prompt": "x"}] * 2)
        config_cls, trainer_cls = (DistillationConfig, DistillationTrainer) if rule is None else (TIPConfig, TIPTrainer)
    else:
        dataset = Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}] * 2)
        config_cls, trainer_cls = (GKDConfig, GKDTrainer) if rule is None else (TIPGKDConfig, TIPGKDTrainer)
    args = config_cls(workdir, **common, **selection)
    return trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer)


def make_batch(kind: str, prompt_len: int, completion_len: int, tokenizer, device, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, vocab, (2, prompt_len), generator=g)
    completion = torch.randint(10, vocab, (2, completion_len), generator=g)
    if kind == "distill":
        return {
            "prompt_ids": prompt.to(device),
            "prompt_mask": torch.ones_like(prompt).to(device),
            "completion_ids": completion.to(device),
            "completion_mask": torch.ones_like(completion).to(device),
        }
    input_ids = torch.cat([prompt, completion], 1)
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_step(trainer, batch, device, repeats: int):
    """Peak memory above the pre-step allocation (bytes) and median time (ms) of compute_loss + backward."""
    model = trainer.model
    model.train()
    peaks, times = [], []
    for i in range(repeats + 1):  # the first run warms up
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        start = time.perf_counter()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        sync(device)
        elapsed = (time.perf_counter() - start) * 1e3
        if i > 0:
            times.append(elapsed)
            if device.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated() - base)
        del loss
    model.zero_grad(set_to_none=True)
    return (max(peaks) if peaks else None), statistics.median(times)


def measure_loss_only(trainer, batch, device, repeats: int, rule: str | None, ratio: float):
    """Time of the distillation loss alone (projections + divergence, forward + backward) from fixed hidden states."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from trl_tip import selected_chunked_loss

    student, teacher = trainer.model, trainer.teacher_model
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    keep = batch["completion_ids"].shape[1]
    with torch.no_grad():
        h_s = trainer._get_last_hidden_state(student, input_ids, attention_mask, keep).detach()
        h_t = trainer._get_last_hidden_state(teacher, input_ids, attention_mask, keep).detach()
    h_s.requires_grad_(True)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    mask = batch["completion_mask"]
    times = []
    for i in range(repeats + 1):
        h_s.grad = None
        w_s.grad = None
        sync(device)
        start = time.perf_counter()
        if rule is None:
            loss = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0)[0]
        else:
            loss = selected_chunked_loss(h_s, h_t, (w_s, None), (w_t, None), mask, 1.0, rule, ratio).loss
        loss.backward()
        sync(device)
        if i > 0:
            times.append((time.perf_counter() - start) * 1e3)
    h_s.grad = None
    w_s.grad = None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny test models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="distill,gkd", help="comma-separated subset of distill,gkd")
    parser.add_argument("--rows", default=None, help="comma-separated completion lengths (default 3584,8192)")
    opts = parser.parse_args()

    tiny = opts.tiny
    device = torch.device("cpu") if tiny else torch.device("cuda")
    if not tiny and not torch.cuda.is_available():
        raise RuntimeError("The full benchmark needs a CUDA device; use --tiny for the CPU smoke test.")
    prompt_len = 8 if tiny else 512
    completions = [int(x) for x in opts.rows.split(",")] if opts.rows else ([24] if tiny else [3584, 8192])
    repeats = 1 if tiny else opts.repeats

    workdir = tempfile.mkdtemp()
    tokenizer = tiny_models.build_tokenizer(Path(workdir) / "tokenizer")
    tokenizer.padding_side = "left"
    student, teacher = build_models(tiny, device, tokenizer)
    vocab = student.config.vocab_size
    weights = torch.cuda.memory_allocated() if device.type == "cuda" else None

    results = []
    for completion_len in completions:
        for kind in opts.kinds.split(","):
            cases = [(None, 1.0)] + RULES
            for rule, ratio in cases:
                label = ("TRL DistillationTrainer" if kind == "distill" else "TRL GKDTrainer") if rule is None else rule
                row = {
                    "kind": kind, "case": label, "rule": rule or "trl", "ratio": ratio, "batch": 2,
                    "prompt": prompt_len, "completion": completion_len, "device": torch.cuda.get_device_name() if
                    device.type == "cuda" else "cpu", "weights_bytes": weights,
                }  # fmt: skip
                trainer = make_trainer(kind, rule, ratio, student, teacher, tokenizer, tiny, workdir)
                batch = make_batch(kind, prompt_len, completion_len, tokenizer, device, vocab)
                try:
                    peak, step_ms = measure_step(trainer, batch, device, repeats)
                    row.update(peak_bytes=peak, step_ms=step_ms, status="ok")
                    if kind == "distill":
                        row["loss_ms"] = measure_loss_only(trainer, batch, device, repeats, rule, ratio)
                except torch.OutOfMemoryError:
                    row.update(peak_bytes=None, step_ms=None, status="OOM")
                del trainer, batch
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                results.append(row)
                print(json.dumps(row), flush=True)

    Path(opts.out).write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: list[dict]) -> None:
    print("\n| completion | trainer | case | ratio | peak above weights (GiB) | x of TRL | step (ms) | loss part (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    baseline = {(r["completion"], r["kind"]): r for r in results if r["rule"] == "trl"}
    for r in results:
        base = baseline.get((r["completion"], r["kind"]))
        peak = r.get("peak_bytes")
        ratio = (
            f"{peak / base['peak_bytes']:.2f}" if peak and base and base.get("peak_bytes") else "-"
        )
        peak_text = f"{peak / 2**30:.2f}" if peak is not None else ("OOM" if r["status"] == "OOM" else "-")
        step = f"{r['step_ms']:.0f}" if r.get("step_ms") is not None else "-"
        loss = f"{r['loss_ms']:.0f}" if r.get("loss_ms") is not None else "-"
        print(f"| {r['completion']} | {r['kind']} | {r['case']} | {r['ratio']} | {peak_text} | {ratio} | {step} | {loss} |")


if __name__ == "__main__":
    main()
