"""The decode step's GPU work under the conditions vLLM gives it, against the microbenchmark's.

Written to isolate an end-to-end regression (benchmarks/RESULTS.md, 2026-11-25: 8.4 -> 18.5 ms per
decode step at 64K in vLLM between 7e07c93 and later code, while the operator alone got faster). Its
first run found it (2026-11-26): the index write of one decode step took 310 us per layer.
Each row is one decode step's work for one layer, captured in a CUDA graph and timed with
`graph_time_ms` (L2 flushed between replays), plus its per-kernel times (CUPTI):

- operator (`sparse_decode_triton` with a workspace), in four conditions: the microbenchmark's
  contiguous (blocks, tokens, heads, dim) cache or vLLM FlashAttention's (blocks, heads, tokens, 2 x dim)
  cache seen through `transpose(1, 2).split(dim)` (what `gpu_backend` passes); random normal keys or
  keys shaped like vLLM's dummy weights (a fixed per-channel factor in +-1e-3, queries scaled by 1e-3).
  Both take vLLM's batch padding (`--real` sequences of `--context` tokens, the rest seq_len 0 on the
  null block) and block-table width (`--max-model-len` / 64);
- the index write of one decode step (`write_index_triton`, one new token per real sequence, each in a
  partly filled selection block), with the call's `key` / `slot_mapping` of `--real`, the padded
  batch, or `--padded-rows` rows (padding slots -1), as vLLM may pass a persistent buffer.

    python benchmarks/bench_vllm_conditions.py [--context 65536] [--real 5] [--batch 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from bench_sparse_decode import graph_time_ms
from profile_sparse_decode import kernel_times_us
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.index_write import IndexWriteWorkspace, write_index_triton
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton

HQ, HKV, D, CBS = 32, 8, 128, 64  # Qwen3-8B attention, vLLM cache block 64


def build(a, config, vllm_layout: bool, dummy: bool, g: torch.Generator):
    """(step, index, key_cache, table, seq_lens) for one condition."""
    per_seq = a.context // CBS
    nb = a.real * per_seq + 1 + 1  # block 0 is the null block of padded rows; one spare for decode
    kv = torch.randn(nb, HKV, CBS, 2 * D, device="cuda", dtype=torch.bfloat16, generator=g)
    if dummy:
        w = (torch.rand(HKV, 1, D, device="cuda", generator=g) * 2 - 1) * 1e-3
        kv[..., :D] = (kv[..., :D].float() * w).to(torch.bfloat16)
    if vllm_layout:
        key_cache, value_cache = kv.transpose(1, 2).split(D, dim=-1)
    else:
        key_cache = kv[..., :D].transpose(1, 2).contiguous()
        value_cache = kv[..., D:].transpose(1, 2).contiguous()
    width = math.ceil(a.max_model_len / CBS)
    table = torch.zeros(a.batch, width, dtype=torch.int32, device="cuda")
    table[: a.real, :per_seq] = (torch.randperm(nb - 2, device="cuda", generator=g).to(torch.int32) + 1).view(
        a.real, per_seq)
    seq_lens = torch.zeros(a.batch, dtype=torch.int32, device="cuda")
    seq_lens[: a.real] = a.context
    query = torch.randn(a.batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    if dummy:
        query = (query.float() * 1e-3).to(torch.bfloat16)
    index = ref.allocate_index(nb, CBS, HKV, D, config, torch.bfloat16, "cuda")
    sample = key_cache[table[0, :64].long()].reshape(-1, HKV, D)
    ref.set_index_channels(index, ref.choose_index_channels(sample, config.index_channels,
                                                           metric=config.index_channel_metric))
    write_ws = IndexWriteWorkspace(nb, index.block_min.shape[1], "cuda")
    for b in range(a.real):
        for c0 in range(0, per_seq, 256):
            blocks = table[b, c0:c0 + 256].long()
            slots = (blocks.view(-1, 1) * CBS + torch.arange(CBS, device="cuda")).view(-1)
            write_index_triton(index, key_cache[blocks].reshape(-1, HKV, D), slots, config, write_ws)
    ws = SparseDecodeWorkspace(a.batch, HQ, HKV, D, D, width, CBS, config, query.dtype, "cuda")
    scale = 1.0 / math.sqrt(D)

    def step():
        return sparse_decode_triton(query, key_cache, value_cache, table, seq_lens, index, config, scale,
                                    workspace=ws)

    return step, index, key_cache, write_ws


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--real", type=int, default=5, help="sequences decoding (the rest of --batch is padding)")
    p.add_argument("--batch", type=int, default=8, help="the captured batch size vLLM pads to")
    p.add_argument("--max-model-len", type=int, default=98440)
    p.add_argument("--padded-rows", type=int, nargs="*", default=[8192, 16384],
                   help="index-write rows to try besides the real tokens and the padded batch")
    p.add_argument("--out")
    a = p.parse_args(argv)
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for vllm_layout in (False, True):
        for dummy in (False, True):
            step, index, key_cache, write_ws = build(a, config, vllm_layout, dummy, g)
            name = f"operator, {'vLLM' if vllm_layout else 'contiguous'} cache, {'dummy-weight' if dummy else 'normal'} keys"
            row = dict(what=name, graph_us=graph_time_ms(step) * 1e3, kernels_us=kernel_times_us(step, iters=5))
            rows.append(row)
            print(f"{name}: {row['graph_us']:.1f} us", flush=True)
            if vllm_layout and dummy:
                # One decode token per real sequence, at offset 5 of a fresh cache block (a partly
                # filled selection block), rows past the real tokens padded with -1.
                spare = index.block_min.shape[0] - 1
                for n in [a.real, a.batch, *a.padded_rows]:
                    key = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
                    slots = torch.full((n,), -1, dtype=torch.int64, device="cuda")
                    slots[: a.real] = spare * CBS + 5 + torch.arange(a.real, device="cuda")

                    def write():
                        write_index_triton(index, key, slots, config, write_ws)

                    wrow = dict(what=f"index write, {a.real} new tokens in a call of {n} rows",
                                graph_us=graph_time_ms(write) * 1e3, kernels_us=kernel_times_us(write, iters=5))
                    rows.append(wrow)
                    print(f"{wrow['what']}: {wrow['graph_us']:.1f} us", flush=True)
            del step, index, key_cache, write_ws
            torch.cuda.empty_cache()
    out = dict(device=torch.cuda.get_device_name(), args=vars(a), rows=rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
