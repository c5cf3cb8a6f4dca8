"""Next GPU session's study (not yet run on a GPU): an MLA attention split that reads each latent row once.

The shipped split kernel (`sparse_attention._sparse_attn_split_kernel`) scores a tile of MLA rows through
`_gathered_qk` in 64-channel steps over all 576 channels, then loads the first 512 channels of the same rows
again as V. This variant loads the tile's 512 latent channels once, scores them with the query's first 512
channels in one dot, adds the 64 rope channels' dot, and multiplies the same tile into the accumulator. Same
split plan (`attention_plan`), same split buffers, the shipped merge kernel.

GPU: positions drawn at random over a 32K paged cache (2,176 per sequence, budget 2048's attended tokens),
latent 576 / 512, 16 heads (B = 16, 64, 136) and 20 heads (B = 64), fp8 and bf16 caches. Each variant's output
is compared with `sparse_attention_triton`'s, then split + merge are timed from a CUDA graph (L2 flushed), in
one run. Writes $OUT/mla_split_variants.json.

Without CUDA (`TRITON_INTERPRET=1`): the correctness check only, on a small case (run from `benchmarks/`)."""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

from asynctls_tip_kernels import sparse_attention as sa  # noqa: E402

LATENT, ROPE = 512, 64


@triton.jit
def _mla_split_one_load_kernel(
    q_ptr, c_ptr, bt_ptr, pos_ptr, m_out_ptr, l_out_ptr, acc_out_ptr, qk_scale, k_scale_ptr, P,
    stride_qb, stride_qh, stride_qd, stride_cb, stride_ct, stride_cd, stride_btb, stride_pb,
    HQ: tl.constexpr, CBS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr,
    NUM_SPLITS: tl.constexpr, LAT: tl.constexpr, RO: tl.constexpr, KV_FP8: tl.constexpr, IEEE: tl.constexpr,
):
    # One kv head (MLA). s = scale * (q[:LAT] . c[:LAT] + q[LAT:] . c[LAT:]), acc = sum p c[:LAT]: the tile's
    # LAT channels are loaded once for both dots. IEEE: float32 dots (the interpreter, as the shipped kernels).
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < HQ
    offs_l = tl.arange(0, LAT)
    offs_r = LAT + tl.arange(0, RO)
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_l[None, :] * stride_qd, mask=h_mask[:, None], other=0.0)
    q_rope = tl.load(q_row + offs_r[None, :] * stride_qd, mask=h_mask[:, None], other=0.0)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, LAT), tl.float32)
    start = pid_s * SPLIT_LEN
    for n0 in range(0, SPLIT_LEN, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        pos = tl.load(pos_ptr + b * stride_pb + offs_n, mask=offs_n < P, other=-1)
        valid = pos >= 0
        pos_c = tl.where(valid, pos, 0)
        phys = tl.load(bt_ptr + b * stride_btb + pos_c // CBS, mask=valid, other=0).to(tl.int64)
        row = c_ptr + phys * stride_cb + (pos_c % CBS) * stride_ct
        c = tl.load(row[:, None] + offs_l[None, :] * stride_cd, mask=valid[:, None], other=0.0).to(q_lat.dtype)
        r = tl.load(row[:, None] + offs_r[None, :] * stride_cd, mask=valid[:, None], other=0.0).to(q_lat.dtype)
        if IEEE:
            s = (tl.dot(q_lat.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
                 + tl.dot(q_rope.to(tl.float32), tl.trans(r.to(tl.float32)), input_precision="ieee"))
        else:
            s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_rope, tl.trans(r))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, c.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new
    if KV_FP8:
        acc = acc * tl.load(k_scale_ptr)  # MLA: V is the latent, one scale for both
    out_row = (b * HQ + heads) * NUM_SPLITS + pid_s
    tl.store(m_out_ptr + out_row, m_i, mask=h_mask)
    tl.store(l_out_ptr + out_row, l_i, mask=h_mask)
    tl.store(acc_out_ptr + out_row[:, None] * LAT + offs_l[None, :], acc, mask=h_mask[:, None])


def mla_one_load(query, latent_cache, block_table, positions, scale, k_scale, workspace, out, warps=4, stages=2):
    """The variant over `latent_cache` (blocks, CBS, 1, 576) with the shipped plan's splits and merge."""
    B, Hq, Dk = query.shape
    P = positions.shape[2]
    kv_fp8 = latent_cache.dtype in sa.FP8_CACHE_DTYPES
    plan = sa.attention_plan(B, Hq, 1, P, Dk, LATENT, query_bytes=query.element_size(),
                             kv_bytes=latent_cache.element_size())
    grid = (B, plan["head_blocks"], plan["NUM_SPLITS"])
    c = latent_cache[:, :, 0]
    _mla_split_one_load_kernel[grid](
        query, c, block_table, positions, workspace.m, workspace.l, workspace.acc, float(scale) * sa._LOG2E,
        k_scale if kv_fp8 else workspace.m, P,
        query.stride(0), query.stride(1), query.stride(2), c.stride(0), c.stride(1), c.stride(2),
        block_table.stride(0), positions.stride(0),
        HQ=Hq, CBS=c.shape[1], BLOCK_H=plan["BLOCK_H"], BLOCK_N=plan["BLOCK_N"], SPLIT_LEN=plan["SPLIT_LEN"],
        NUM_SPLITS=plan["NUM_SPLITS"], LAT=LATENT, RO=Dk - LATENT, KV_FP8=kv_fp8,
        IEEE=sa.float32_dots(query.dtype if kv_fp8 else latent_cache.dtype), num_warps=warps,
        num_stages=stages)
    sa._sparse_attn_merge_kernel[(B * Hq,)](
        workspace.m, workspace.l, workspace.acc, out, out.stride(0), out.stride(1), out.stride(2),
        HQ=Hq, DV=LATENT, BLOCK_DV=LATENT, NUM_SPLITS=plan["NUM_SPLITS"],
        **sa.merge_plan(plan["NUM_SPLITS"], LATENT), PDL=0, num_warps=4)
    return out


def case(B, Hq, context, P, fp8, device, seed=0):
    """Query (B, Hq, 576) bf16, a paged latent cache of `context` tokens per sequence (blocks of 64, shuffled),
    and P distinct random positions per sequence (B, 1, P) int32."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = -(-context // 64)
    table = torch.randperm(B * W, device=device, generator=g).view(B, W).to(torch.int32)
    cache = torch.randn(B * W, 64, 1, LATENT + ROPE, device=device, generator=g).to(torch.bfloat16)
    query = torch.randn(B, Hq, LATENT + ROPE, device=device, generator=g).to(torch.bfloat16)
    positions = torch.stack([torch.randperm(context, device=device, generator=g)[:P] for _ in range(B)])
    positions[:, -P // 7:] = -1  # padding at the end of each list, as the selection leaves it
    k_scale = None
    if fp8:
        k_scale = torch.tensor([0.5], device=device)
        cache = (cache.float() / 0.5).to(torch.float8_e4m3fn)
    return query, cache, table, positions.view(B, 1, P).to(torch.int32).contiguous(), k_scale


def run(B, Hq, fp8, device, context=32768, P=2176, time_it=True):
    q, cache, table, positions, k_scale = case(B, Hq, context, P, fp8, device)
    scale = 192 ** -0.5
    scales = (k_scale, k_scale) if fp8 else None
    plan = sa.attention_plan(B, Hq, 1, P, LATENT + ROPE, LATENT, kv_bytes=cache.element_size())
    ws = sa.AttentionWorkspace(B, Hq, plan["NUM_SPLITS"], LATENT, q.device)
    out_shipped = torch.empty(B, Hq, LATENT, dtype=q.dtype, device=q.device)
    out_variant = torch.empty_like(out_shipped)

    def shipped():
        return sa.sparse_attention_triton(q, cache, cache[..., :LATENT], table, positions, scale, out=out_shipped,
                                          workspace=ws, kv_scales=scales)

    def variant():
        return mla_one_load(q, cache, table, positions, scale, k_scale, ws, out_variant)

    want = shipped().float().clone()
    got = variant().float().clone()
    row = dict(batch=B, heads=Hq, fp8=fp8, positions=P, plan={k: plan[k] for k in ("BLOCK_N", "SPLIT_LEN",
                                                                                    "NUM_SPLITS")},
               max_abs_diff=float((got - want).abs().max()))
    if time_it:
        from bench_sparse_decode import graph_time_ms

        row["shipped_us"] = graph_time_ms(shipped) * 1e3
        row["one_load_us"] = graph_time_ms(variant) * 1e3
    return row


def main():
    if not torch.cuda.is_available():  # the interpreter: correctness on a small case
        for heads, fp8 in ((16, False), (16, True), (20, False)):
            row = run(2, heads, fp8, "cpu", context=512, P=150, time_it=False)
            print(row, flush=True)
            assert row["max_abs_diff"] < 0.05, row
        return
    rows = []
    for Hq, B in ((16, 16), (16, 64), (16, 136), (20, 64)):
        for fp8 in (True, False):
            rows.append(run(B, Hq, fp8, "cuda"))
            r = rows[-1]
            print(f"MLA {Hq} heads B={B}{' fp8' if fp8 else ''}: split + merge {r['shipped_us']:.1f} us shipped, "
                  f"{r['one_load_us']:.1f} one load; max diff {r['max_abs_diff']:.2e}", flush=True)
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "mla_split_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
