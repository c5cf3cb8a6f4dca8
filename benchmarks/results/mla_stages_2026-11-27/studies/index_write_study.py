"""Where the MLA index write's 17.7 us per decode step goes (GPU, no vLLM). For GQA (Qwen3-8B: 8 kv heads x
128) and MLA (1 x 576) at B=8 and 16, one new key per sequence merged into its last selection block:
the write from a CUDA graph of its own (as profile_sparse_decode reports it), each kernel's device time
(CUPTI), the per-layer cost of 8 layers' writes replayed back to back from one graph (what a model's decode
graph pays) and, for scale, a graph of one one-element kernel. Writes $OUT/index_write_study.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "benchmarks"))
from bench_sparse_decode import CACHE_BLOCK, graph_time_ms, paged_case, stacked_time_ms  # noqa: E402
from profile_sparse_decode import kernel_times_us  # noqa: E402

from asynctls_tip_kernels.index_write import IndexWriteWorkspace, write_index_triton  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402


def case(B, Hkv, D, mla, layers=8, context=8192):
    config = (SparseAttentionConfig.for_mla if mla else SparseAttentionConfig)(
        selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = paged_case(B, context - 1, 16 if mla else 32, Hkv, D, D if not mla else 512,
                                                   config, mla=mla, seed=2)
    pos = seq_lens.long()  # the next position: merged into the partly filled last selection block
    slots = table[torch.arange(B, device="cuda"), pos // CACHE_BLOCK].long() * CACHE_BLOCK + pos % CACHE_BLOCK
    keys = torch.randn(B, Hkv, D, device="cuda", dtype=torch.bfloat16)
    copies = [dataclasses.replace(index, **{n: getattr(index, n).clone() for n in
                                            ("block_min", "block_max", "block_scale", "codes", "scales")})
              for _ in range(layers)]
    ws = IndexWriteWorkspace(index.block_min.shape[0], index.block_min.shape[1], "cuda")
    steps = [lambda c=c: write_index_triton(c, keys, slots, config, ws) for c in copies]
    row = dict(B=B, Hkv=Hkv, D=D, mla=mla,
               own_graph_us=graph_time_ms(steps[0]) * 1e3,
               per_layer_stacked_us=stacked_time_ms(steps) * 1e3,  # stacked_time_ms is per call
               kernels_us=kernel_times_us(steps[0]))
    if mla:  # vLLM's per-layer key rows: torch.cat of kv_c_normed (B, 512) and k_pe (B, 1, 64)
        kv_c, k_pe = torch.randn(B, 512, device="cuda", dtype=torch.bfloat16), torch.randn(
            B, 1, 64, device="cuda", dtype=torch.bfloat16)
        cat = [lambda: torch.cat([kv_c.unsqueeze(1), k_pe], dim=-1) for _ in range(layers)]
        row["cat_per_layer_stacked_us"] = stacked_time_ms(cat) * 1e3
    print(row, flush=True)
    return row


def main():
    x = torch.zeros(1, device="cuda")
    rows = [dict(one_element_kernel_graph_us=graph_time_ms(lambda: x.add_(1)) * 1e3,
                 one_element_kernel_stacked_us=stacked_time_ms([lambda: x.add_(1)] * 8) * 1e3)]
    print(rows[0])
    for B in (8, 16):
        rows.append(case(B, 8, 128, False))
        rows.append(case(B, 1, 576, True))
    with open(os.path.join(os.environ.get("OUT", "."), "index_write_study.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
