"""Plot the operator tables of `bench_sparse_decode.py` against the issue's targets.

Reads one or more JSON files the benchmark wrote (`--out`) and draws, for one batch size and budget,
the per-layer speedup over SDPA (N layers in one CUDA graph) and the per-layer time over the byte floor
against the context, one line per schedule found in the files (standard step, lagged / pipelined,
pipelined with the deferred join), with the targets (12x at 64K, 20x at 128K; 1.5x the floor) marked
where the files hold the shapes the targets are stated at (Qwen3-8B's; files from before `--model-shapes`
are Qwen3-8B's).

    python benchmarks/plot_sparse_decode.py --out speedup.png \\
        benchmarks/results/pdl_trigger_h100_2026-11-26/standard_grid.json \\
        benchmarks/results/pdl_trigger_h100_2026-11-26/lagged_grid_b8.json \\
        benchmarks/results/pdl_trigger_h100_2026-11-26/deferred_b8.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGET_SPEEDUP = {65536: 12.0, 131072: 20.0}
TARGET_FLOOR = 1.5
SHAPE_TITLES = {"qwen3-8b": "Qwen3-8B", "llama-3.2-1b": "Llama-3.2-1B"}


def schedule(row: dict) -> str:
    """The schedule a benchmark row was timed with."""
    if row.get("defer_block_join"):
        return "pipelined, block stage joined by the next layer"
    return "lagged, pipelined" if row.get("lagged") else "standard"


def load_results(paths: list[Path]) -> list[dict]:
    """The result files `bench_sparse_decode.py --out` wrote, each read once."""
    return [json.loads(path.read_text()) for path in paths]


def per_layer_rows(files: list[dict], batch: int, budget: int) -> dict[str, list[dict]]:
    """Rows of the loaded result `files` with a per-layer timing for `batch` and `budget`, by schedule, sorted
    by context."""
    rows: dict[str, list[dict]] = {}
    for f in files:
        for row in f["rows"]:
            if (row.get("kind") == "gqa" and row["B"] == batch and row["budget"] == budget
                    and "speedup_per_layer" in row):
                rows.setdefault(schedule(row), []).append(row)
    for found in rows.values():
        found.sort(key=lambda r: r["context"])
    return rows


def gqa_shapes(files: list[dict]) -> str:
    """The `--model-shapes` the loaded result `files` with per-layer GQA rows were written with (one for all)."""
    names = {f.get("gqa_shapes", {}).get("model", "qwen3-8b") for f in files
             if any(r.get("kind") == "gqa" and "speedup_per_layer" in r for r in f["rows"])} or {"qwen3-8b"}
    if len(names) != 1:
        raise ValueError(f"plot_sparse_decode: the files hold different GQA shapes {sorted(names)}; plot one at a time")
    return names.pop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path, help="JSON files written by bench_sparse_decode.py --out")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--out", type=Path, required=True, help="image to write (.png)")
    a = p.parse_args(argv)
    files = load_results(a.inputs)
    try:
        shapes = gqa_shapes(files)
    except ValueError as e:
        p.error(str(e))
    rows = per_layer_rows(files, a.batch, a.budget)
    if not rows:
        p.error(f"no per-layer GQA rows for --batch {a.batch} and --budget {a.budget} in {[str(x) for x in a.inputs]} "
                "(run the benchmark with --layers N)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, found in rows.items():
        ctx = [r["context"] // 1024 for r in found]
        ax_s.plot(ctx, [r["speedup_per_layer"] for r in found], marker="o", label=name)
        ax_f.plot(ctx, [r["over_floor_per_layer"] for r in found], marker="o", label=name)
    if shapes == "qwen3-8b":  # the targets are stated at these shapes
        for context, target in TARGET_SPEEDUP.items():
            ax_s.scatter([context // 1024], [target], marker="*", s=160, color="black", zorder=5)
        ax_s.scatter([], [], marker="*", s=160, color="black", label="target")
        ax_f.axhline(TARGET_FLOOR, color="black", linestyle="--", linewidth=1, label=f"target ({TARGET_FLOOR}x)")
    for ax, ylabel in ((ax_s, "speedup over SDPA, per layer"), (ax_f, "time / byte floor, per layer")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_xticks(sorted({r["context"] // 1024 for found in rows.values() for r in found}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_s.legend(fontsize=8)
    ax_f.legend(fontsize=8)
    fig.suptitle(f"AsyncTLS operator, B={a.batch}, budget {a.budget}, {SHAPE_TITLES.get(shapes, shapes)} shapes, bf16")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
