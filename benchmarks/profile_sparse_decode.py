"""Per-kernel GPU time of one AsyncTLS decode step (where the operator's time goes).

Builds the benchmark's random paged case (Qwen3-8B shapes unless --model-shapes, bf16, block 64, 128
blocks), times the whole operator replayed from a CUDA graph, with and without programmatic dependent
launch (PDL: each kernel starts while the previous one drains) in the same run, then runs it eagerly without PDL under
torch.profiler (CUPTI) and prints each kernel's mean device time (with PDL a kernel's time would include
its wait for the previous one). The gap between the graph time without PDL and the kernel sum is launch
and drain time between the dependent kernels. For hardware counters on one kernel, run this script under Nsight
Compute, e.g. `ncu -k regex:_token_score --launch-skip 2 --launch-count 1 --section SpeedOfLight python3 ...`.

With --lagged, the step runs lagged selection: its block stage on its own stream, overlapped with the
token stage and the attention over the previous step's blocks (the per-kernel times then overlap).
With --mla, the MLA operator instead (DeepSeek-V2-Lite latent 512 + rope 64, one kv head, --heads query
heads, `SparseAttentionConfig.for_mla` at the same block settings); with --fp8 the cache is e4m3 with
per-tensor scales (vLLM's `--kv-cache-dtype fp8`), and the row also gives the bytes a dense decode reads.
The step's index write (one new key per sequence) is timed through both of the writer's launch plans in the
same run: one pass (shipped for decode-sized calls) and the two claim kernels.

Usage: python benchmarks/profile_sparse_decode.py [--batch 8] [--context 65536] [--budget 2048] [--lagged]
       [--model-shapes llama-3.2-1b]
       [--index-basis pca] [--mla [--heads 16]] [--fp8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.profiler import ProfilerActivity, profile

from bench_sparse_decode import GQA_SHAPES, MLA, decode_write_ms, graph_time_ms, paged_case
from asynctls_tip_kernels import index_write, sparse_attention, sparse_decode
from asynctls_tip_kernels.sparse_config import INDEX_BASES, SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton


def kernel_times_us(fn, iters: int = 20) -> dict[str, float]:
    """Mean device time per launch of every kernel `fn` launches (eager, CUPTI)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "self_device_time_total", 0)
        if total > 0 and event.count > 0:
            times[f"{event.key} (x{event.count // iters})"] = total / event.count
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--lagged", action="store_true",
                   help="lagged selection: the block stage on its own stream, pipelined with the token stage")
    p.add_argument("--index-basis", choices=INDEX_BASES, default="channels",
                   help="the index's coordinates (SparseAttentionConfig.index_basis)")
    p.add_argument("--model-shapes", default="qwen3-8b", choices=sorted(GQA_SHAPES),
                   help="the GQA attention shapes: Qwen3-8B (32 q / 8 kv heads of 128) or Llama-3.2-1B (of 64)")
    p.add_argument("--mla", action="store_true", help="the MLA operator (latent 512 + rope 64, one kv head)")
    p.add_argument("--heads", type=int, default=16, help="query heads with --mla (DeepSeek-V2-Lite: 16)")
    p.add_argument("--fp8", action="store_true", help="an e4m3 cache with per-tensor scales")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.mla:
        Hq, Hkv, Dk, Dv = a.heads, 1, MLA["kv_lora_rank"] + MLA["rope_dim"], MLA["kv_lora_rank"]
        config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=a.budget,
                                               lagged_selection=a.lagged, index_basis=a.index_basis)
    else:
        shapes = GQA_SHAPES[a.model_shapes]
        Hq, Hkv = shapes["num_q_heads"], shapes["num_kv_heads"]
        Dk = Dv = shapes["head_dim"]
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=a.budget,
                                       lagged_selection=a.lagged, index_basis=a.index_basis)
    q, kc, vc, table, seq_lens, index = paged_case(a.batch, a.context, Hq, Hkv, Dk, Dv, config, mla=a.mla, seed=1)
    kv_scales, written_keys = None, kc  # the index write is timed on the keys as computed (bf16)
    if a.fp8:  # stored = value / scale, as vLLM writes it; the index stays the one written from the bf16 keys
        kv_scales = (torch.tensor(0.5, device="cuda"), torch.tensor(0.25, device="cuda"))
        kc8 = (kc.float() / 0.5).to(torch.float8_e4m3fn)
        if a.mla:
            kv_scales = (kv_scales[0], kv_scales[0])  # one latent row: k_scale for both, as TRITON_MLA
            kc, vc = kc8, kc8[..., :Dv]
        else:
            kc, vc = kc8, (vc.float() / 0.25).to(torch.float8_e4m3fn)
    ws = SparseDecodeWorkspace(a.batch, Hq, Hkv, Dk, Dv, table.shape[1], kc.shape[1], config, q.dtype, "cuda",
                               kv_dtype=kc.dtype)
    scale = 1.0 / math.sqrt(192 if a.mla else Dk)  # DeepSeek-V2's softmax scale: qk_nope + rope head dim
    previous = sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale,
                                    kv_scales=kv_scales)[2].clone() if a.lagged else None

    def step():
        return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, previous_block_ids=previous,
                                    workspace=ws, kv_scales=kv_scales)

    has_pdl = hasattr(sparse_attention, "pdl_enabled")  # absent in kernels older than 2026-11-25 evening
    row = dict(device=torch.cuda.get_device_name(), batch=a.batch, context=a.context, budget=a.budget,
               model_shapes=None if a.mla else a.model_shapes, head_dim=Dk,
               lagged=a.lagged, index_basis=a.index_basis, mla=a.mla, heads=Hq, fp8=a.fp8,
               # what a dense decode reads: every K (and, but for MLA's shared latent row, V) row of the context
               dense_bytes=a.batch * a.context * Hkv * (Dk if a.mla else Dk + Dv) * kc.element_size())
    if has_pdl:
        row["pdl_supported"] = sparse_attention.pdl_enabled(q)
        row["graph_us"] = graph_time_ms(step) * 1e3  # as shipped: PDL where the operator's schedule uses it
        if hasattr(sparse_decode, "PDL_STANDARD_STEP"):  # the per-schedule choice (2026-11-26 on)
            saved = sparse_decode.PDL_STANDARD_STEP, sparse_decode.PDL_PIPELINED_STEP
            sparse_decode.PDL_STANDARD_STEP = sparse_decode.PDL_PIPELINED_STEP = True
            try:
                row["graph_us_pdl_everywhere"] = graph_time_ms(step) * 1e3
            finally:
                sparse_decode.PDL_STANDARD_STEP, sparse_decode.PDL_PIPELINED_STEP = saved
        sparse_attention.USE_PDL = False
    row["graph_us_no_pdl"] = graph_time_ms(step) * 1e3
    row["kernels_us"] = kernel_times_us(step)  # without PDL: no kernel starts before the previous one ends
    if has_pdl:
        sparse_attention.USE_PDL = True
    def write_us(layers):
        return decode_write_ms(written_keys, table, seq_lens, index, config, layers=layers) * 1e3

    row["index_write_us"] = write_us(1)
    row["index_write_us_per_layer_of_8"] = write_us(8)
    if hasattr(index_write, "ONE_PASS_MAX_TOKENS"):  # the claim kernels: the decode write before 2026-11-27
        saved = index_write.ONE_PASS_MAX_TOKENS
        index_write.ONE_PASS_MAX_TOKENS = 0
        try:
            row["index_write_claimed_us"] = write_us(1)
            row["index_write_claimed_us_per_layer_of_8"] = write_us(8)
        finally:
            index_write.ONE_PASS_MAX_TOKENS = saved
    print(f"{row['device']}, B={a.batch}, context {a.context}, budget {a.budget}{', lagged' if a.lagged else ''}: whole step from a CUDA graph "
          f"{row.get('graph_us', float('nan')):.1f} us as shipped (PDL supported: {row.get('pdl_supported')}), "
          f"{row.get('graph_us_pdl_everywhere', float('nan')):.1f} us with PDL on every launch, "
          f"{row['graph_us_no_pdl']:.1f} us without")
    for name, us in row["kernels_us"].items():
        print(f"  {name[:60]:60s} {us:7.2f} us per launch")
    print(f"  the step's index write (one new key per sequence): {row['index_write_us']:.1f} us alone from a CUDA graph, "
          f"{row['index_write_us_per_layer_of_8']:.1f} us per layer with 8 layers' writes in one graph")
    if "index_write_claimed_us" in row:
        print(f"  the same write through the claim kernels (two launches): {row['index_write_claimed_us']:.1f} us "
              f"alone, {row['index_write_claimed_us_per_layer_of_8']:.1f} us per layer of 8")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(row, f, indent=1)
    return row


if __name__ == "__main__":
    main()
