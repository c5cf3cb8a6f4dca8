"""AsyncTLS sparse decode operator vs dense decode attention on the GPU, plus attention-mass recall.

What it measures (one run, same data):
- ours: `sparse_decode_triton` with a preallocated workspace, captured in a CUDA graph (index reads,
  block scores + top-k, token scores + top-k, split-K attention + merge; not the index write);
- dense: `torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)` on the same
  keys/values laid out contiguously (B, H, L, D), also captured in a CUDA graph;
- bytes our operator must read (summaries of the sequence's blocks, index codes + scales of the
  kept blocks' tokens, K and V of the attended rows) over the measured copy bandwidth: the byte floor;
- MLA rows (latent 512 + rope 64, Hkv = 1) against a dense matmul-softmax-matmul over the latent cache;
- attention-mass recall of asynctls, block_only and exact_topk at the same budget on keys with
  planted structure (heavy-hitter channels, clustered and scattered planted directions), through the
  reference's `attention_mass_recall`.
With `--layers N`, each GQA shape that fits N copies is also timed per layer with N layers (each its
own cache and index) back to back in one CUDA graph, ours and dense alike: the cost inside a model's
decode graph, where the fixed cost of launching a graph (~4.8 us on the H100) is paid once per step,
not once per layer.
The GQA rows run at Qwen3-8B's attention shapes (32 q / 8 kv heads of 128); `--model-shapes llama-3.2-1b`
runs them at Llama-3.2-1B's (of 64), with `--no-recall`.
Before timing each shape, the Triton operator is checked against the reference at that shape (max
output error, share of equal positions).

    python benchmarks/bench_sparse_decode.py --out benchmarks/out/sparse_decode.json [--quick]
    python benchmarks/bench_sparse_decode.py --model-shapes llama-3.2-1b --no-recall --no-mla --layers 4 --batches 8
Timings: triton.testing.do_bench (median, L2 flushed between replays) over CUDA-graph replays.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton

from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.index_write import IndexWriteWorkspace, write_index_triton
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton

QWEN3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)  # Qwen3-8B attention (config.json)
# The GQA rows' attention shapes (`--model-shapes`), each from its model's config.json.
GQA_SHAPES = {"qwen3-8b": QWEN3_8B, "llama-3.2-1b": dict(num_q_heads=32, num_kv_heads=8, head_dim=64)}
MLA = dict(kv_lora_rank=512, rope_dim=64)  # DeepSeek-V2-Lite / GLM-4.7-Flash latent layout
CACHE_BLOCK = 64
GiB = 1 << 30


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second."""
    x = torch.empty(GiB, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    del x, y
    torch.cuda.empty_cache()
    return 2 * (2 * GiB) / (ms * 1e-3)


def graph_time_ms(fn) -> float:
    """Median time of one replay of `fn` captured in a CUDA graph (L2 flushed between replays)."""
    return stacked_time_ms([fn])


def stacked_time_ms(steps) -> float:
    """Median time per call of `steps` (callables, e.g. one per layer, each on its own data) replayed back
    to back from one CUDA graph (L2 flushed between replays). With several layers: the per-layer cost
    inside a model's decode graph, which pays no graph launch per layer (a graph of one tiny kernel takes
    ~4.8 us on the H100)."""
    for fn in steps:
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in steps:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in steps:
            fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=150, return_mode="median")
    del graph
    return ms / len(steps)


def forced_split_plan(plan, splits: int):
    """`plan` (an `attention_plan`) with the attention's split count forced to `splits` (tiles per split =
    ceil(tiles / splits)), for split-count sweeps: install it as `sparse_attention.attention_plan` and
    `sparse_decode.attention_plan`."""
    def forced(batch, *args, **kwargs):
        p = dict(plan(batch, *args, **kwargs))
        tiles = triton.cdiv(args[2], p["BLOCK_N"])
        per = triton.cdiv(tiles, splits)
        p.update(SPLIT_LEN=per * p["BLOCK_N"], NUM_SPLITS=triton.cdiv(tiles, per))
        return p
    return forced


def split_kernel_resources() -> list[dict]:
    """Registers and spills per thread and shared memory of every compiled variant of the attention's split
    kernel in this process (read from Triton's kernel cache, its internals): what bounds the programs per SM.
    `key` is Triton's cache key (argument types and constexprs: which shape the variant is)."""
    from asynctls_tip_kernels import sparse_attention
    rows = []
    for caches in sparse_attention._sparse_attn_split_kernel.device_caches.values():
        for key, kernel in caches[0].items():
            rows.append(dict(split_kernel_n_regs=kernel.n_regs, n_spills=kernel.n_spills,
                             shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
                             kv_fp8="fp8e4nv" in str(key) or "fp8e5" in str(key), key=str(key)))
    return rows


def paged_case(B, L, Hq, Hkv, Dk, Dv, config, mla=False, seed=0):
    """Random bf16 paged cache for B sequences of L tokens with a shuffled block table, and its
    index written by the Triton writer (sequence by sequence, in chunks)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = math.ceil(L / CACHE_BLOCK)
    nblocks = B * W
    table = torch.randperm(nblocks, device="cuda", generator=g).view(B, W).to(torch.int32)
    key_cache = torch.randn(nblocks, CACHE_BLOCK, Hkv, Dk, device="cuda", dtype=torch.bfloat16, generator=g)
    value_cache = key_cache[..., :Dv] if mla else torch.randn(
        nblocks, CACHE_BLOCK, Hkv, Dv, device="cuda", dtype=torch.bfloat16, generator=g)
    query = torch.randn(B, Hq, Dk, device="cuda", dtype=torch.bfloat16, generator=g)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    index = ref.allocate_index(nblocks, CACHE_BLOCK, Hkv, Dk, config, torch.bfloat16, "cuda")
    sample = key_cache[table[0, : min(W, 64)].long()].reshape(-1, Hkv, Dk)
    ref.calibrate_index(index, sample, config)
    ws = IndexWriteWorkspace(nblocks, index.block_min.shape[1], "cuda")
    chunk_blocks = max(1, 65536 // CACHE_BLOCK)
    for b in range(B):
        for c0 in range(0, W, chunk_blocks):
            blocks = table[b, c0: c0 + chunk_blocks].long()
            slots = (blocks.view(-1, 1) * CACHE_BLOCK + torch.arange(CACHE_BLOCK, device="cuda")).view(-1)
            write_index_triton(index, key_cache[blocks].reshape(-1, Hkv, Dk), slots, config, ws)
    return query, key_cache, value_cache, table, seq_lens, index


def decode_write_ms(key_cache, table, seq_lens, index, config, layers: int = 1) -> float:
    """Time of the index write a decode step adds per layer, which dense attention does not have: one
    new key per sequence merged into its partly filled last selection block (the key at position
    L - 1 written again, into a copy of the index). `layers` = 1: a lone write from a graph of its own
    (graph launch and a chain of dependent loads from a flushed L2: an upper bound); more: per layer,
    `layers` writes into their own index copies back to back in one graph (as in a model's decode
    graph, where the write is one small launch among many)."""
    copies = [dataclasses.replace(index, **{name: getattr(index, name).clone()
                                            for name in ("block_min", "block_max", "block_scale", "codes", "scales")
                                            if getattr(index, name) is not None}) for _ in range(layers)]
    pos = seq_lens.long() - 1
    slots = table[torch.arange(len(pos), device=pos.device), pos // CACHE_BLOCK].long() * CACHE_BLOCK + pos % CACHE_BLOCK
    keys = key_cache.view(-1, *key_cache.shape[2:])[slots]
    ws = IndexWriteWorkspace(index.block_min.shape[0], index.block_min.shape[1], "cuda")
    ms = stacked_time_ms([lambda c=c: write_index_triton(c, keys, slots, config, ws) for c in copies])  # per call
    del copies
    return ms


def operator_bytes(B, L, Hkv, Dk, Dv, config, elem=2) -> int:
    """Bytes the operator must read: summaries of the sequence's blocks, index of the kept tokens,
    K and V of the attended rows (query, output, tables and scores are negligible and not counted)."""
    S = config.selection_block_size
    summaries = math.ceil(L / S) * (2 * Dk + 4)  # int8 min / max codes and one float32 scale per block
    if config.index_bits == 16:
        index = config.num_blocks * S * Dk * elem
    else:
        index = config.num_blocks * S * (config.index_channels * config.index_bits // 8 + 4)
    attended = min(config.attended_tokens, L)
    kv = attended * (Dk + Dv) * elem
    return B * Hkv * (summaries + index + kv)


def stage_breakdown(B, L, budget=2048):
    """Graph-captured time of each stage of the operator alone (Qwen3-8B shapes)."""
    from asynctls_tip_kernels.block_select import block_scores_triton, topk_rows
    from asynctls_tip_kernels.sparse_attention import sparse_attention_triton
    from asynctls_tip_kernels.token_select import token_scores_triton
    Hq, Hkv, D = QWEN3_8B["num_q_heads"], QWEN3_8B["num_kv_heads"], QWEN3_8B["head_dim"]
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget)
    q, kc, vc, table, seq_lens, index = paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
    scale = 1.0 / math.sqrt(D)
    ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], CACHE_BLOCK, config, q.dtype, "cuda")
    sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=ws)
    n_sel = ws.num_selection_blocks
    S = config.selection_block_size
    stages = {
        "block_scores": lambda: block_scores_triton(q, index, table, seq_lens, config, n_sel, out=ws.block_scores),
        "block_topk": lambda: topk_rows(ws.block_scores.view(B * Hkv, n_sel), config.num_blocks,
                                        out=ws.block_ids.view(B * Hkv, -1)),
        "token_scores": lambda: token_scores_triton(q, index, kc, table, seq_lens, ws.block_ids, config,
                                                    out=ws.token_scores),
        "token_topk": lambda: topk_rows(ws.token_scores.view(B * Hkv, -1), budget,
                                        out=ws.positions.view(B * Hkv, -1), block_map=ws.block_ids.view(B * Hkv, -1),
                                        map_block_size=S, seq_lens=seq_lens, sink_tokens=config.sink_tokens,
                                        local_tokens=config.local_tokens, rows_per_seq=Hkv),
        "attention": lambda: sparse_attention_triton(q, kc, vc, table, ws.positions, scale, out=ws.out,
                                                     workspace=ws.attention),
        "whole": lambda: sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=ws),
    }
    row = dict(kind="breakdown", B=B, context=L, budget=budget)
    for name, fn in stages.items():
        row[name + "_us"] = graph_time_ms(fn) * 1e3
    print("  breakdown " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    del q, kc, vc, index
    torch.cuda.empty_cache()
    return row


def sweep(B=8, L=65536, budget=2048):
    """Whole-step time at one shape over launch settings of each stage (module tunables of the kernels).

    Each setting is timed as the whole operator replayed from a CUDA graph, not the stage alone: alone
    and replayed, a stage finds its inputs warm in L2 (the 64K summaries are 33.5 MB, inside the
    H100's 50 MB L2), which inside the step they are not. One stage varies at a time, the others
    keep their defaults; `us` is the whole step."""
    from asynctls_tip_kernels import block_select, sparse_attention, token_select
    Hq, Hkv, D = QWEN3_8B["num_q_heads"], QWEN3_8B["num_kv_heads"], QWEN3_8B["head_dim"]
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget)
    q, kc, vc, table, seq_lens, index = paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
    scale = 1.0 / math.sqrt(D)
    ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], CACHE_BLOCK, config, q.dtype, "cuda")
    rows = []

    def step():
        return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=ws)

    def run(name, module, settings):
        nonlocal ws
        saved = {k: getattr(module, k) for k in settings}
        for k, v in settings.items():
            setattr(module, k, v)
        try:  # a workspace per setting: the attention's split count depends on its launch settings
            ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], CACHE_BLOCK, config, q.dtype, "cuda")
            us = graph_time_ms(step) * 1e3
        finally:
            for k, v in saved.items():
                setattr(module, k, v)
        rows.append(dict(kind="sweep", stage=name, B=B, context=L, us=us, **settings))
        print(f"  sweep {name} {settings}: whole step {us:.1f} us", flush=True)

    for tile, warps, dk, stages in ((128, 4, 64, 2), (64, 4, 64, 2), (64, 4, 128, 1), (32, 4, 128, 1),
                                    (32, 2, 128, 1), (64, 8, 128, 1), (128, 8, 64, 3), (32, 4, 64, 2),
                                    (16, 2, 128, 1)):
        run("block_scores", block_select, dict(BLOCK_SCORE_TILE=tile, BLOCK_SCORE_WARPS=warps,
                                               BLOCK_SCORE_DK=dk, BLOCK_SCORE_STAGES=stages))
    for sub in (1, 2, 4):  # the word path (GQA groups; MLA's dot path has TOKEN_SCORE_TILE / _WARPS)
        for warps in (4, 8):
            run("token_scores", token_select, dict(WORD_SCORE_SUB=sub, WORD_SCORE_WARPS=warps))
    run("token_scores", token_select, dict(WORD_SCORE_PAIRS=False))
    for small in (2, 4, 8):
        for large in (4, 8, 16):
            run("topk", block_select, dict(TOPK_WARPS_SMALL=small, TOPK_WARPS_LARGE=large))
    for per_sm in (4, 8, 16, 32):  # the short-split plan at every batch
        for block_n, warps, stages in ((32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 3), (16, 4, 3), (16, 2, 2)):
            run("attention", sparse_attention, dict(ATTN_LONG_SPLITS=False, ATTN_PROGRAMS_PER_SM=per_sm,
                                                    ATTN_BLOCK_N=block_n, ATTN_NUM_WARPS=warps, ATTN_NUM_STAGES=stages))
    for per_sm in (2, 3, 4, 6):  # the long-split plan (batches of at least ATTN_LONG_SPLIT_MIN_GROUPS groups)
        for stages in (2, 3, 4):
            run("attention", sparse_attention, dict(ATTN_LONG_SPLIT_PROGRAMS_PER_SM=per_sm,
                                                    ATTN_LONG_SPLIT_STAGES=stages))
    del q, kc, vc, index
    torch.cuda.empty_cache()
    return rows


def check_at_shape(query, key_cache, value_cache, table, seq_lens, index, config, scale, previous_block_ids=None):
    want_out, want_pos, _ = ref.sparse_decode(query, key_cache, value_cache, table, seq_lens, index, config, scale,
                                              previous_block_ids=previous_block_ids)
    got_out, got_pos, _ = sparse_decode_triton(query, key_cache, value_cache, table, seq_lens, index, config, scale,
                                               previous_block_ids=previous_block_ids)
    again = ref.sparse_attention(query, key_cache, value_cache, table, got_pos, scale)
    return dict(
        max_err_vs_reference=float((got_out.float() - want_out.float()).abs().max()),
        max_err_vs_reference_on_own_positions=float((got_out.float() - again.float()).abs().max()),
        positions_equal_share=float((got_pos == want_pos).float().mean()),
    )


def bench_gqa(B, L, budgets, bw, check, num_blocks=128, index_channels=None, index_channel_metric=None,
              lagged=False, layers=0, block_bound_weight=None, selection_block_size=64, defer_block_join=False,
              index_basis="channels", shapes=QWEN3_8B):
    Hq, Hkv, D = shapes["num_q_heads"], shapes["num_kv_heads"], shapes["head_dim"]
    base = SparseAttentionConfig(selection_block_size=selection_block_size, num_blocks=num_blocks, token_budget=2048,
                                 index_basis=index_basis)
    if index_channels is not None:
        base = base.with_(index_channels=index_channels)
    if index_channel_metric is not None:
        base = base.with_(index_channel_metric=index_channel_metric)
    if block_bound_weight is not None:
        base = base.with_(block_bound_weight=block_bound_weight)
    q, kc, vc, table, seq_lens, index = paged_case(B, L, Hq, Hkv, D, D, base, seed=B * 7 + L)
    scale = 1.0 / math.sqrt(D)
    # Dense baseline on the same data laid out contiguously (B, H, L, D).
    k = kc[table.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
    v = vc[table.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous()
    qd = q.view(B, Hq, 1, D)
    dense_ms = graph_time_ms(lambda: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True))
    dense_err = float((F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True).view(B, Hq, D).float()
                       - sparse_decode_triton(q, kc, vc, table, seq_lens, index, base.with_(mode="dense"), scale)[0]
                       .float()).abs().max())
    del k, v
    # --layers: `layers` layers, each with its own cache and index, back to back in one graph (as in a
    # model's decode graph); dense the same over per-layer contiguous copies.
    stack = []
    if layers > 1:
        stack = [(q, kc, vc, table, seq_lens, index)] + [
            paged_case(B, L, Hq, Hkv, D, D, base, seed=B * 7 + L + i) for i in range(1, layers)]
        dense_layer_ms = _dense_per_layer_ms(stack, qd, L, scale)
    rows = []
    for budget in budgets:
        config = base.with_(token_budget=budget, lagged_selection=lagged)
        # Lagged: the previous step's blocks are this query's own (a decode query that did not move);
        # the step's block stage then runs on its own stream (see sparse_decode_triton).
        previous = sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale)[2].clone() if lagged else None
        checked = check_at_shape(q, kc, vc, table, seq_lens, index, config, scale, previous) if check else {}
        ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], CACHE_BLOCK, config, q.dtype, "cuda")
        ours_ms = graph_time_ms(lambda: sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale,
                                                             previous_block_ids=previous, workspace=ws))
        write_ms = decode_write_ms(kc, table, seq_lens, index, config)
        nbytes = operator_bytes(B, L, Hkv, D, D, config)
        floor_ms = nbytes / bw * 1e3
        rows.append(dict(kind="gqa", B=B, context=L, budget=budget, heads=Hq, kv_heads=Hkv, head_dim=D,
                         num_blocks=config.num_blocks,
                         selection_block_size=config.selection_block_size,
                         index_channels=config.index_channels, block_bound_weight=config.block_bound_weight,
                         index_basis=config.index_basis, lagged=lagged, dense_ms=dense_ms, ours_ms=ours_ms,
                         speedup=dense_ms / ours_ms, index_write_ms=write_ms,
                         speedup_with_index_write=dense_ms / (ours_ms + write_ms), bytes=nbytes, floor_ms=floor_ms,
                         over_floor=ours_ms / floor_ms, dense_ops_err_vs_sdpa=dense_err, **checked))
        if stack:
            ours_layer_ms = _ours_per_layer_ms(stack, config, scale, ws, lagged, defer_block_join)
            rows[-1].update(layers=layers, defer_block_join=defer_block_join,
                            dense_ms_per_layer=dense_layer_ms, ours_ms_per_layer=ours_layer_ms,
                            speedup_per_layer=dense_layer_ms / ours_layer_ms,
                            over_floor_per_layer=ours_layer_ms / floor_ms)
            print(f"    {layers} layers in one graph: dense {dense_layer_ms:.3f} ms, ours {ours_layer_ms:.4f} ms per "
                  f"layer, {dense_layer_ms / ours_layer_ms:.1f}x, {ours_layer_ms / floor_ms:.2f}x floor", flush=True)
        print(f"  gqa{' lagged' if lagged else ''} B={B} L={L} budget={budget}: dense {dense_ms:.3f} ms, ours {ours_ms:.4f} ms, "
              f"{dense_ms / ours_ms:.1f}x ({dense_ms / (ours_ms + write_ms):.1f}x with the step's index write, "
              f"{write_ms * 1e3:.1f} us), {ours_ms / floor_ms:.2f}x floor {checked}", flush=True)
    del q, kc, vc, index, stack
    torch.cuda.empty_cache()
    return rows


def _dense_per_layer_ms(stack, qd, L, scale) -> float:
    """SDPA per layer over each layer's own contiguous K/V copy, the layers back to back in one graph."""
    B, Hkv, D = qd.shape[0], stack[0][1].shape[2], qd.shape[-1]
    dense_kv = [(kc[table.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous(),
                 vc[table.long()].reshape(B, -1, Hkv, D)[:, :L].transpose(1, 2).contiguous())
                for _, kc, vc, table, _, _ in stack]
    return stacked_time_ms([(lambda k=k, v=v: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True))
                            for k, v in dense_kv])


def _ours_per_layer_ms(stack, config, scale, ws, lagged, defer_block_join=False) -> float:
    """The operator per layer, each layer on its own cache and index (one shared workspace, as in vLLM),
    the layers back to back in one graph; lagged: each layer's previous blocks are its query's own.
    defer_block_join: each layer's block stage is joined by the next layer (its ids in a buffer of its
    own), the last layer's right after it."""
    steps = []
    for i, (q, kc, vc, table, seq_lens, index) in enumerate(stack):
        prev = sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale)[2].clone() if lagged else None
        ids_out = torch.empty_like(prev) if defer_block_join else None

        def step(q=q, kc=kc, vc=vc, table=table, seq_lens=seq_lens, index=index, prev=prev, ids_out=ids_out,
                 last=i == len(stack) - 1):
            out = sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, previous_block_ids=prev,
                                       workspace=ws, block_ids_out=ids_out, defer_block_join=defer_block_join)
            if defer_block_join and last:
                ws.join_block_stage()
            return out

        steps.append(step)
    return stacked_time_ms(steps)


def bench_mla(B, L, H, bw, check):
    Dk, Dv = MLA["kv_lora_rank"] + MLA["rope_dim"], MLA["kv_lora_rank"]
    config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = paged_case(B, L, H, 1, Dk, Dv, config, mla=True, seed=H + L)
    scale = 1.0 / math.sqrt(192)  # DeepSeek-V2 softmax scale uses qk_nope + rope head dim
    latent = kc[table.long()].reshape(B, -1, Dk)[:, :L].contiguous()  # (B, L, Dk)

    def dense_mla():
        logits = torch.matmul(q, latent.transpose(1, 2)).float() * scale  # (B, H, L)
        probs = torch.softmax(logits, dim=-1).to(latent.dtype)
        return torch.matmul(probs, latent[..., :Dv])  # (B, H, Dv)

    dense_ms = graph_time_ms(dense_mla)
    checked = check_at_shape(q, kc, vc, table, seq_lens, index, config, scale) if check else {}
    ws = SparseDecodeWorkspace(B, H, 1, Dk, Dv, table.shape[1], CACHE_BLOCK, config, q.dtype, "cuda")
    ours_ms = graph_time_ms(lambda: sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale,
                                                         workspace=ws))
    # MLA reads each attended latent row once (value = its first Dv channels): count Dk only.
    S = config.selection_block_size
    nbytes = B * (math.ceil(L / S) * (2 * Dk + 4) + config.num_blocks * S * (config.index_channels // 2 + 4)
                  + config.attended_tokens * Dk * 2)
    floor_ms = nbytes / bw * 1e3
    del q, kc, vc, index, latent
    torch.cuda.empty_cache()
    row = dict(kind="mla", B=B, context=L, heads=H, budget=config.token_budget, dense_ms=dense_ms, ours_ms=ours_ms,
               speedup=dense_ms / ours_ms, bytes=nbytes, floor_ms=floor_ms, over_floor=ours_ms / floor_ms, **checked)
    print(f"  mla B={B} L={L} H={H}: dense {dense_ms:.3f} ms, ours {ours_ms:.4f} ms, {dense_ms / ours_ms:.1f}x, "
          f"{ours_ms / floor_ms:.2f}x floor {checked}", flush=True)
    return row


def structured_keys(B, L, Hkv, D, G, gen):
    """Keys and queries with structure like real models': a few heavy-hitter channels with large,
    consistent offsets in keys and queries; planted directions aligned with each group's query in
    clustered runs (semantic locality) and scattered single tokens (needles), at varying strength."""
    device = gen.device  # the generator decides: "cuda" in the full run, "cpu" with --device cpu
    keys = torch.randn(B, L, Hkv, D, device=device, generator=gen)
    heavy = torch.randperm(D, device=device, generator=gen)[:6]
    offsets = torch.randn(Hkv, 6, device=device, generator=gen) * 6
    keys[..., heavy] = keys[..., heavy] * 0.5 + offsets
    qdir = torch.randn(B, Hkv, D, device=device, generator=gen)
    qdir = qdir / qdir.norm(dim=-1, keepdim=True)
    for b in range(B):
        for h in range(Hkv):
            for _ in range(24):  # clusters
                start = int(torch.randint(0, L - 48, (1,), device=device, generator=gen))
                n = int(torch.randint(4, 48, (1,), device=device, generator=gen))
                strength = 4 + 8 * torch.rand(n, 1, device=device, generator=gen)
                keys[b, start:start + n, h] += strength * qdir[b, h]
            needles = torch.randint(0, L, (256,), device=device, generator=gen)
            keys[b, needles, h] += (4 + 8 * torch.rand(256, 1, device=device, generator=gen)) * qdir[b, h]
    q = qdir.unsqueeze(2) * 3.0 + 0.5 * torch.randn(B, Hkv, G, D, device=device, generator=gen)
    q[..., heavy] += offsets.view(1, Hkv, 1, 6).sign() * 1.0
    return keys, q.reshape(B, Hkv * G, D)


def recall_rows(L, budgets, B=2, seed=0, device="cuda", group_score=None, index_channel_metric=None,
                num_blocks=128, index_channels=None, block_bound_weight=None, selection_block_size=64,
                index_basis="channels"):
    """Recall rows; on the GPU through the Triton operator (and the reference beside it), with
    device="cpu" through the reference alone (same generator, same settings).

    Besides the three modes (all under the config's `group_score`, default or `group_score`), each row
    holds two references for the exact top-k: `exact_topk_max_rule` (exact scores, the group's max:
    the oracle as first defined, for comparison with older rows) and `mass_optimal` (the candidates
    holding the most dense attention mass: no selection of the budget holds more)."""
    on_gpu = device == "cuda"
    Hq, Hkv, D = QWEN3_8B["num_q_heads"], QWEN3_8B["num_kv_heads"], QWEN3_8B["head_dim"]
    G = Hq // Hkv
    gen = torch.Generator(device=device).manual_seed(seed)
    keys, query = structured_keys(B, L, Hkv, D, G, gen)
    W = math.ceil(L / CACHE_BLOCK)
    table = torch.randperm(B * W, device=device, generator=gen).view(B, W).to(torch.int32)
    key_cache = torch.zeros(B * W, CACHE_BLOCK, Hkv, D, device=device, dtype=torch.bfloat16)
    key_cache[table.long()] = keys.view(B, W, CACHE_BLOCK, Hkv, D).to(torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
    query = query.to(torch.bfloat16)
    scale = 1.0 / math.sqrt(D)
    rows = []
    for budget in budgets:
        config = SparseAttentionConfig(selection_block_size=selection_block_size, num_blocks=num_blocks,
                                       token_budget=budget, index_basis=index_basis)
        if index_channels is not None:
            config = config.with_(index_channels=index_channels)
        if group_score is not None:
            config = config.with_(group_score=group_score)
        if index_channel_metric is not None:
            config = config.with_(index_channel_metric=index_channel_metric)
        if block_bound_weight is not None:
            config = config.with_(block_bound_weight=block_bound_weight)
        index = ref.allocate_index(B * W, CACHE_BLOCK, Hkv, D, config, torch.bfloat16, device)
        flat = keys.reshape(B * L, Hkv, D).to(torch.bfloat16)
        ref.calibrate_index(index, flat[: 8 * 1024], config)  # the first sequence's first 8K keys
        slots = (table.long().view(B, W, 1) * CACHE_BLOCK + torch.arange(CACHE_BLOCK, device=device)).view(-1)
        if on_gpu:
            write_index_triton(index, flat, slots, config)
        else:
            ref.write_index(index, flat, slots, config)
        row = dict(kind="recall", context=L, budget=budget, B=B, group_score=config.group_score,
                   index_channel_metric=config.index_channel_metric, num_blocks=config.num_blocks,
                   index_channels=config.index_channels, block_bound_weight=config.block_bound_weight,
                   selection_block_size=config.selection_block_size, index_basis=config.index_basis)
        decode = sparse_decode_triton if on_gpu else ref.sparse_decode
        for mode in ("asynctls", "block_only", "exact_topk"):
            _, pos, _ = decode(query, key_cache, value_cache, table, seq_lens, index, config.with_(mode=mode), scale)
            row[mode] = float(ref.attention_mass_recall(query, key_cache, table, seq_lens, pos, scale).mean())
        ref_pos = ref.sparse_decode(query, key_cache, value_cache, table, seq_lens, index, config, scale)[1]
        row["asynctls_reference"] = float(ref.attention_mass_recall(query, key_cache, table, seq_lens, ref_pos,
                                                                    scale).mean())
        max_rule = ref.exact_topk_positions(query, key_cache, table, seq_lens, config.with_(group_score="max"), scale)
        row["exact_topk_max_rule"] = float(ref.attention_mass_recall(query, key_cache, table, seq_lens, max_rule,
                                                                     scale).mean())
        best = ref.mass_optimal_positions(query, key_cache, table, seq_lens, config, scale)
        row["mass_optimal"] = float(ref.attention_mass_recall(query, key_cache, table, seq_lens, best, scale).mean())
        row["asynctls_over_exact"] = row["asynctls"] / row["exact_topk"]
        row["asynctls_over_exact_max_rule"] = row["asynctls"] / row["exact_topk_max_rule"]
        row["asynctls_over_mass_optimal"] = row["asynctls"] / row["mass_optimal"]
        rows.append(row)
        print(f"  recall L={L} budget={budget} group_score={config.group_score}: asynctls {row['asynctls']:.4f} "
              f"(reference {row['asynctls_reference']:.4f}), block_only {row['block_only']:.4f}, exact_topk "
              f"{row['exact_topk']:.4f}; asynctls / exact_topk {row['asynctls_over_exact']:.3f}, / exact_topk "
              f"(max rule, {row['exact_topk_max_rule']:.4f}) {row['asynctls_over_exact_max_rule']:.3f}, / mass "
              f"optimal ({row['mass_optimal']:.4f}) {row['asynctls_over_mass_optimal']:.3f}", flush=True)
    return rows


def fits(B, L, layers=1, shapes=QWEN3_8B) -> bool:
    # Paged K and V plus the contiguous copy for SDPA, per layer, bf16; 20% headroom.
    need = 2 * max(layers, 1) * (B * L * shapes["num_kv_heads"] * shapes["head_dim"] * 2 * 2)
    return need * 1.2 < torch.cuda.get_device_properties(0).total_memory


def markdown(results) -> str:
    out = [f"Device: {results['device']}; date {results['date']}; command `{results['command']}`; "
           f"copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s" + (
               "; GQA shapes {model}: {num_q_heads} q / {num_kv_heads} kv heads of {head_dim}".format(
                   **results["gqa_shapes"]) if "gqa_shapes" in results else ""), "",
           "| kind | B | context | budget | dense ms | ours ms | speedup | with the step's index write | "
           "ours / byte floor | max err vs ref | equal positions |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["kind"] == "recall":
            continue
        label = ("gqa lagged" if r.get("lagged") else "gqa") if r["kind"] == "gqa" else f"mla H={r['heads']}"
        err = r.get("max_err_vs_reference")
        eq = r.get("positions_equal_share")
        with_write = r.get("speedup_with_index_write")
        out.append(f"| {label} | {r['B']} | {r['context']} | {r['budget']} | {r['dense_ms']:.3f} | "
                   f"{r['ours_ms']:.4f} | {r['speedup']:.1f}x | {'-' if with_write is None else f'{with_write:.1f}x'} | "
                   f"{r['over_floor']:.2f} | "
                   f"{'-' if err is None else f'{err:.2e}'} | {'-' if eq is None else f'{eq:.4f}'} |")
    stacked = [r for r in results["rows"] if "ours_ms_per_layer" in r]
    if stacked:
        out += ["", "Per layer, N layers back to back in one CUDA graph (as in a model's decode graph):", "",
                "| kind | B | context | budget | layers | dense ms | ours ms | speedup | ours / byte floor |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in stacked:
            label = "gqa lagged" if r.get("lagged") else "gqa"
            label += ", join deferred" if r.get("defer_block_join") else ""
            out.append(f"| {label} | {r['B']} | {r['context']} | {r['budget']} | "
                       f"{r['layers']} | {r['dense_ms_per_layer']:.3f} | {r['ours_ms_per_layer']:.4f} | "
                       f"{r['speedup_per_layer']:.1f}x | {r['over_floor_per_layer']:.2f} |")
    rec = [r for r in results["rows"] if r["kind"] == "recall"]
    if rec:
        out += ["", "| recall context | budget | group_score | asynctls | asynctls (reference) | block_only | "
                "exact_topk | asynctls / exact | exact_topk (max rule) | asynctls / it | mass optimal | "
                "asynctls / it |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rec:
            out.append(f"| {r['context']} | {r['budget']} | {r['group_score']} | {r['asynctls']:.4f} | "
                       f"{r['asynctls_reference']:.4f} | {r['block_only']:.4f} | {r['exact_topk']:.4f} | "
                       f"{r['asynctls_over_exact']:.3f} | {r['exact_topk_max_rule']:.4f} | "
                       f"{r['asynctls_over_exact_max_rule']:.3f} | {r['mass_optimal']:.4f} | "
                       f"{r['asynctls_over_mass_optimal']:.3f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write JSON results here")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    p.add_argument("--budgets", type=int, nargs="*", default=[2048, 1024, 512])
    p.add_argument("--no-check", action="store_true", help="skip the reference check at each shape")
    p.add_argument("--no-mla", action="store_true")
    p.add_argument("--no-recall", action="store_true")
    p.add_argument("--recall-only", action="store_true", help="only the recall rows (runs on the CPU with --device cpu)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: recall through the reference only")
    p.add_argument("--recall-context", type=int, default=None, help="recall context (default 16384; 8192 with --quick)")
    p.add_argument("--recall-batch", type=int, default=2, help="sequences in the recall rows")
    p.add_argument("--group-score", default=None, choices=("lse", "max"),
                   help="recall rows: how a GQA group combines its heads' scores (default: the config's)")
    p.add_argument("--index-channel-metric", default=None, choices=("mean_abs", "std"),
                   help="GQA and recall rows: how the token index's channels are chosen (default: the config's)")
    p.add_argument("--block-bound-weight", type=float, default=None,
                   help="GQA and recall rows: block score weight of the Quest bound vs the midpoint (default: the config's 1.0)")
    p.add_argument("--selection-block-size", type=int, default=64,
                   help="GQA and recall rows: tokens per block summary (the paper's 64; the plugin's default is 16 "
                        "with 512 blocks, the same 8,192 candidates)")
    p.add_argument("--index-basis", default="channels", choices=("channels", "pca"),
                   help="the index's coordinates (SparseAttentionConfig.index_basis), GQA and recall rows")
    p.add_argument("--model-shapes", default="qwen3-8b", choices=sorted(GQA_SHAPES),
                   help="the GQA rows' attention shapes: Qwen3-8B (32 q / 8 kv heads of 128) or Llama-3.2-1B (of 64)")
    p.add_argument("--num-blocks", type=int, default=128, help="blocks kept by the coarse level (GQA and recall rows)")
    p.add_argument("--index-channels", type=int, default=None, help="token index channels (GQA and recall rows)")
    p.add_argument("--lagged", action="store_true",
                   help="GQA rows: lagged selection, the block stage pipelined on its own stream (paper's pipelining)")
    p.add_argument("--defer-block-join", action="store_true",
                   help="with --lagged --layers: each layer's block stage is joined by the next layer "
                        "(sparse_decode_triton(defer_block_join=True)), the last layer's after it")
    p.add_argument("--layers", type=int, default=0,
                   help="GQA rows: also time N layers (own cache and index each) back to back in one CUDA graph, "
                        "per layer, as inside a model's decode graph (no graph launch per layer)")
    p.add_argument("--breakdown", action="store_true", help="time each stage alone at B=1, 8 (16K, 64K, 128K) and exit")
    p.add_argument("--sweep", action="store_true", help="whole-step time over each stage's launch settings at B=8, 64K (with --breakdown)")
    p.add_argument("--tune", action="store_true",
                   help="run the sweep first and time everything with the fastest setting of each stage")
    args = p.parse_args(argv)
    if args.defer_block_join and not (args.lagged and args.layers):
        p.error(f"--defer-block-join needs --lagged and --layers N >= 2 (it changes when a layer's block stage is "
                f"joined); got --lagged={args.lagged}, --layers={args.layers}")
    if args.layers == 1 or args.layers < 0:
        p.error(f"--layers must be 0 (off) or at least 2; got {args.layers}")
    if args.model_shapes != "qwen3-8b" and (args.recall_only or args.breakdown or args.tune or not args.no_recall):
        p.error(f"--model-shapes {args.model_shapes} applies to the GQA timing rows only (the recall rows, --breakdown "
                f"and --tune run at Qwen3-8B's shapes): add --no-recall, without --recall-only, --breakdown or --tune")
    recall_context = args.recall_context or (16384 if not args.quick else 8192)
    if args.recall_only:
        rows = recall_rows(recall_context, args.budgets, B=args.recall_batch, device=args.device,
                           group_score=args.group_score, index_channel_metric=args.index_channel_metric,
                           num_blocks=args.num_blocks, index_channels=args.index_channels,
                           block_bound_weight=args.block_bound_weight, selection_block_size=args.selection_block_size,
                           index_basis=args.index_basis)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(device=args.device, command=" ".join(["python"] + sys.argv), rows=rows), f, indent=1)
        return
    if args.device != "cuda":
        sys.exit("only --recall-only runs with --device cpu")
    if not torch.cuda.is_available():
        sys.exit("bench_sparse_decode needs a CUDA device")
    if args.quick:
        args.batches, args.contexts, args.budgets = [1, 8], [16384, 65536], [2048]
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    results = dict(device=torch.cuda.get_device_name(0), date=datetime.datetime.now().isoformat(timespec="seconds"),
                   command=" ".join(["python"] + sys.argv), copy_bandwidth_TBps=bw / 1e12,
                   torch=torch.__version__, triton=triton.__version__, rows=[])
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {results['device']}", flush=True)
    if args.tune:
        from asynctls_tip_kernels import block_select, sparse_attention, token_select
        modules = dict(block_scores=block_select, token_scores=token_select, topk=block_select,
                       attention=sparse_attention)
        swept = sweep()
        results["sweep"] = swept
        results["tuned"] = {}
        for stage, module in modules.items():
            best = min((r for r in swept if r["stage"] == stage), key=lambda r: r["us"])
            settings = {k: v for k, v in best.items() if k.isupper() and "_" in k}
            for k, v in settings.items():
                setattr(module, k, v)
            results["tuned"][stage] = settings
        print(f"tuned: {results['tuned']}", flush=True)
    if args.breakdown:
        rows = [stage_breakdown(B, L) for B, L in ((1, 16384), (8, 65536), (8, 131072))]
        if args.sweep:
            rows += sweep()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(results, rows=rows), f, indent=1)
        return
    shapes = GQA_SHAPES[args.model_shapes]
    results["gqa_shapes"] = dict(shapes, model=args.model_shapes)
    for B in args.batches:
        for L in args.contexts:
            if not fits(B, L, shapes=shapes):
                print(f"  skip B={B} L={L}: does not fit", flush=True)
                continue
            layers = args.layers
            if layers and not fits(B, L, layers, shapes):
                print(f"  B={B} L={L}: {layers} layers do not fit; timed per step only", flush=True)
                layers = 0
            # The reference check costs memory and time: run it at B <= 8 (the same kernels serve B = 32).
            results["rows"] += bench_gqa(B, L, args.budgets, bw, check=not args.no_check and B <= 8,
                                         num_blocks=args.num_blocks, index_channels=args.index_channels,
                                         index_channel_metric=args.index_channel_metric, lagged=args.lagged,
                                         layers=layers, block_bound_weight=args.block_bound_weight,
                                         selection_block_size=args.selection_block_size,
                                         defer_block_join=args.defer_block_join, index_basis=args.index_basis,
                                         shapes=shapes)
    if not args.no_mla:
        for H in (16, 128):
            results["rows"].append(bench_mla(8 if not args.quick else 2, 65536 if not args.quick else 16384, H, bw,
                                             check=not args.no_check))
    if not args.no_recall:
        results["rows"] += recall_rows(recall_context, args.budgets, B=args.recall_batch, group_score=args.group_score,
                                       index_channel_metric=args.index_channel_metric, num_blocks=args.num_blocks,
                                       index_channels=args.index_channels, block_bound_weight=args.block_bound_weight,
                                       selection_block_size=args.selection_block_size, index_basis=args.index_basis)
    md = markdown(results)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(results, markdown=md), f, indent=1)


if __name__ == "__main__":
    main()
