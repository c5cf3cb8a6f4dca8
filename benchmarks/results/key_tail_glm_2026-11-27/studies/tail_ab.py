"""The MLA decode step's index write with the latent and rope parts apart (`write_index_triton(...,
key_tail=k_pe)`) against joining them first (`mla_key_rows`: the per-layer `torch.cat` the backend ran before),
in one run (GPU, no vLLM): DeepSeek-V2-Lite / GLM latent rows (512 + 64), one new key per sequence, per layer
with 8 layers' writes in one CUDA graph, B = 8 / 16 / 64, 32K, three interleaved rounds. Each path's index must
equal the other's bit for bit. Writes $OUT/tail_ab.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from bench_sparse_decode import CACHE_BLOCK, MLA, paged_case, stacked_time_ms  # noqa: E402

from asynctls_tip_kernels.index_write import IndexWriteWorkspace, write_index_triton  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402
from vllm_asynctls.mla_decode import mla_key_rows  # noqa: E402

FIELDS = ("block_min", "block_max", "block_scale", "codes", "scales")


def copies(index, n):
    return [dataclasses.replace(index, **{f: getattr(index, f).clone() for f in FIELDS if getattr(index, f) is not None})
            for _ in range(n)]


def run(B, L, rounds=3):
    L_rank, P = MLA["kv_lora_rank"], MLA["rope_dim"]
    config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = paged_case(B, L, 16, 1, L_rank + P, L_rank, config, mla=True, seed=1)
    pos = seq_lens.long() - 1
    slots = table[torch.arange(B, device="cuda"), pos // CACHE_BLOCK].long() * CACHE_BLOCK + pos % CACHE_BLOCK
    rows = kc.view(-1, L_rank + P)[slots]
    # kv_c_normed (N, 512) and k_pe (N, 1, 64), both contiguous here (vLLM's k_pe is often a strided view of
    # the kv_a projection; the tests and a fuzz cover strided tails, this timing does not)
    kv_c = rows[:, :L_rank].contiguous()
    k_pe = rows[:, None, L_rank:].contiguous()
    ws = IndexWriteWorkspace(index.block_min.shape[0], index.block_min.shape[1], "cuda")

    def joined(c):
        write_index_triton(c, mla_key_rows(kv_c, k_pe, kv_c.dtype), slots, config, ws)

    def apart(c):
        write_index_triton(c, kv_c.unsqueeze(1), slots, config, ws, key_tail=k_pe.reshape(B, 1, -1))

    a, b = copies(index, 1)[0], copies(index, 1)[0]
    joined(a)
    apart(b)
    equal = all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS if getattr(a, f) is not None)
    times = {"joined (torch.cat, then write)": [], "apart (key_tail)": []}
    for _ in range(rounds):
        for name, fn in (("joined (torch.cat, then write)", joined), ("apart (key_tail)", apart)):
            cs = copies(index, 8)
            times[name].append(stacked_time_ms([lambda c=c: fn(c) for c in cs]) * 1e3)
            del cs
    row = dict(batch=B, context=L, index_equal=equal, per_layer_of_8_us=times)
    print(f"MLA B={B}, {L}: " + "; ".join(f"{k} {' / '.join(f'{t:.2f}' for t in v)} us" for k, v in times.items())
          + f"; index equal {equal}", flush=True)
    return row


def main():
    rows = [run(B, 32768) for B in (8, 16, 64)]
    rows[0]["device"] = torch.cuda.get_device_name()
    with open(os.path.join(os.environ.get("OUT", "."), "tail_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
