"""Prefill-sized index writes through the claim kernels after this session's refactor (GPU, no vLLM; prepared
2026-11-27, not yet run): the working tree's `write_index_triton` (the claim kernels now load the stored
summary before their scan, whether or not the block is reset, and keep it in registers through it) against
f28640d's (package `asynctls_base_kernels` from `.baseline_kernels/`, carried), in one process. Calls of 8,192
and 65,536 tokens in slot order (vLLM's prefill), MLA (1 x 576) and GQA (8 x 128), from a CUDA graph; both
indexes must be bit-equal. A review flagged the early load as a possible register spill (2026-11-27).
Setup here: `git archive f28640d kernels | tar -x -C /tmp/bk && cp -r /tmp/bk/kernels
.baseline_kernels/asynctls_base_kernels`. Writes $OUT/prefill_write_ab.json."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.append(os.path.join(ROOT, ".baseline_kernels"))  # after the installed package: never shadows it
from bench_sparse_decode import graph_time_ms  # noqa: E402

from asynctls_tip_kernels import index_write as new  # noqa: E402
from asynctls_tip_kernels import sparse_decode_reference as ref  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402

base = importlib.import_module("asynctls_base_kernels.index_write")
assert new.__file__ != base.__file__ and "baseline" in base.__file__, (new.__file__, base.__file__)
FIELDS = ("block_min", "block_max", "block_scale", "codes", "scales")


def run(name, Hkv, D, mla, tokens):
    config = (SparseAttentionConfig.for_mla if mla else SparseAttentionConfig)(
        selection_block_size=64, num_blocks=128, token_budget=2048)
    blocks = tokens // 64 + 1
    index = ref.allocate_index(blocks, 64, Hkv, D, config, torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    keys = torch.randn(tokens, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ref.calibrate_index(index, keys[:4096], config)
    slots = torch.arange(tokens, device="cuda", dtype=torch.int64) + 64  # slot order, from cache block 1
    row = dict(case=name, tokens=tokens, device=torch.cuda.get_device_name())
    written = {}
    for side, mod in (("new", new), ("base", base)):
        copy = dataclasses.replace(index, **{n: getattr(index, n).clone() for n in FIELDS
                                             if getattr(index, n) is not None})
        ws = mod.IndexWriteWorkspace(blocks, 1, "cuda")
        mod.write_index_triton(copy, keys, slots, config, ws)
        written[side] = [getattr(copy, n).clone() for n in FIELDS if getattr(copy, n) is not None]
        row[f"{side}_us"] = graph_time_ms(lambda: mod.write_index_triton(copy, keys, slots, config, ws)) * 1e3
    row["bit_equal"] = all(torch.equal(a, b) for a, b in zip(written["new"], written["base"]))
    row["new_over_base"] = row["new_us"] / row["base_us"]
    return row


def main():
    rows = []
    for name, Hkv, D, mla in (("mla", 1, 576, True), ("gqa", 8, 128, False)):
        for tokens in (8192, 65536):
            rows.append(run(name, Hkv, D, mla, tokens))
            r = rows[-1]
            print(f"{name} {tokens} tokens: {r['base_us']:.1f} us (f28640d) -> {r['new_us']:.1f} us, "
                  f"bit-equal {r['bit_equal']}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "prefill_write_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
