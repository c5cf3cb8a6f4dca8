"""Recall with int8 block summaries rounded outward (research for issue 9, not shipped code).

Runs the benchmark's recall rows (planted-structure keys, 16K, B=2, Qwen3-8B shapes, the reference on
CPU) twice: with the shipped summaries (key-dtype min / max), and with each (selection block, kv head)
summary replaced by int8 codes of a per-(block, head) scale `max_d max(|min_d|, |max_d|) / 127`,
minimum rounded down and maximum rounded up (so q+ . max + q- . min still bounds every q . k of the
block). Prints AsyncTLS / exact top-k and block-only mass for both.

Usage: python benchmarks/research/int8_summaries_2026-11-25/recall_int8_summaries.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import bench_sparse_decode as bench  # noqa: E402
from asynctls_tip_kernels import sparse_decode_reference as ref  # noqa: E402

_write_index = ref.write_index


def _int8_outward(index, key, slots, config):
    _write_index(index, key, slots, config)
    mn, mx = index.block_min.float(), index.block_max.float()
    scale = torch.maximum(mn.abs(), mx.abs()).amax(-1, keepdim=True) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    index.block_min = torch.floor(mn / safe).clamp(-127, 127) * safe
    index.block_max = torch.ceil(mx / safe).clamp(-127, 127) * safe
    assert (index.block_min <= mn).all() and (index.block_max >= mx).all()


def main():
    if hasattr(ref, "dequantize_summary"):
        sys.exit("recall_int8_summaries.py emulates int8 summaries on the old key-dtype layout: run it at commit "
                 "f395b2a. On this tree the summaries are int8 already: python benchmarks/bench_sparse_decode.py "
                 "--recall-only --device cpu")
    results = {}
    for name in ("shipped", "int8_outward"):
        ref.write_index = _write_index if name == "shipped" else _int8_outward
        results[name] = bench.recall_rows(16384, [2048, 1024, 512], B=2, device="cpu")
    ref.write_index = _write_index
    print("summaries | budget | asynctls / exact top-k | block-only mass")
    for name, rows in results.items():
        for r in rows:
            print(f"{name} | {r['budget']} | {r['asynctls_over_exact']:.4f} | {r['block_only']:.4f}")


if __name__ == "__main__":
    main()
