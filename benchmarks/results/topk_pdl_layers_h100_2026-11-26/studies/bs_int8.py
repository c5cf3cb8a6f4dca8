"""Prototype: block bounds with an int8-quantised query and int8 tensor-core dots (no int8->bf16 conversion)."""
import json, math, os, sys
import torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import block_select as bs
from asynctls_tip_kernels.block_select import _combine_heads
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")

@triton.jit
def _bs_int8(q_ptr, bmin_ptr, bmax_ptr, bscale_ptr, bt_ptr, seq_lens_ptr, scores_ptr, N_SEL, SINK, LOCAL, TEMP,
             stride_qb, stride_qh, stride_qd, stride_mb, stride_ms, stride_mh, stride_md, stride_sb, stride_ss, stride_sh,
             stride_btb, HKV: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, SBS: tl.constexpr, CBS: tl.constexpr,
             BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr, LSE: tl.constexpr):
    pid_bg = tl.program_id(0); pid_j = tl.program_id(1)
    b = pid_bg // HKV; g = pid_bg % HKV
    L = tl.load(seq_lens_ptr + b)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    first = offs_j * SBS
    candidate = (offs_j < N_SEL) & (tl.maximum(first, SINK) < tl.minimum(first + SBS, L - LOCAL))
    j_c = tl.where(candidate, offs_j, 0)
    phys = tl.load(bt_ptr + b * stride_btb + (j_c * SBS) // CBS, mask=candidate, other=0).to(tl.int64)
    sub = (j_c * SBS % CBS) // SBS
    row_off = phys * stride_mb + sub * stride_ms + g * stride_mh
    scale = tl.load(bscale_ptr + phys * stride_sb + sub * stride_ss + g * stride_sh, mask=candidate, other=0.0)
    offs_h = tl.arange(0, BLOCK_H); h_mask = offs_h < GROUP
    offs_d = tl.arange(0, DK)
    qf = tl.load(q_ptr + b * stride_qb + (g * GROUP + offs_h)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                 mask=h_mask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(qf), axis=1)
    s = tl.where(amax > 0, amax / 127.0, 1.0)
    qp = tl.floor(tl.maximum(qf, 0.0) / s[:, None] + 0.5).to(tl.int8)
    qn = (-tl.floor(-tl.minimum(qf, 0.0) / s[:, None] + 0.5)).to(tl.int8)
    mn = tl.load(bmin_ptr + row_off[:, None] + offs_d[None, :] * stride_md, mask=candidate[:, None], other=0)
    mx = tl.load(bmax_ptr + row_off[:, None] + offs_d[None, :] * stride_md, mask=candidate[:, None], other=0)
    acc = tl.dot(qp, tl.trans(mx), out_dtype=tl.int32) + tl.dot(qn, tl.trans(mn), out_dtype=tl.int32)
    sc = acc.to(tl.float32) * s[:, None] * scale[None, :]
    sc = tl.where(h_mask[:, None], sc, float("-inf"))
    score = _combine_heads(sc, TEMP, LSE)
    score = tl.where(candidate, score, float("-inf"))
    tl.store(scores_ptr + pid_bg * N_SEL + offs_j, score, mask=offs_j < N_SEL)

def stacked(fn, n=8):
    return bsd.stacked_time_ms([fn] * n) * 1e3

res = []
Hq, Hkv, D = 32, 8, 128
for B, L in ((8, 65536), (8, 131072), (32, 65536)):
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
    n_sel = table.shape[1] * kc.shape[1] // 64
    ref_out = torch.empty(B, Hkv, n_sel, device="cuda")
    t_repo = bsd.graph_time_ms(lambda: bs.block_scores_triton(q, index, table, seq_lens, config, n_sel, out=ref_out)) * 1e3
    t_repo8 = stacked(lambda: bs.block_scores_triton(q, index, table, seq_lens, config, n_sel, out=ref_out))
    bmin, bmax, bscale = index.block_min, index.block_max, index.block_scale
    for block_j, warps, stages in ((128, 4, 1), (128, 8, 1), (64, 4, 1), (256, 8, 1), (32, 4, 1)):
        out = torch.empty_like(ref_out)
        fn = lambda: _bs_int8[(B * Hkv, triton.cdiv(n_sel, block_j))](q, bmin, bmax, bscale, table, seq_lens, out, n_sel,
            config.sink_tokens, config.local_tokens, 1 / math.sqrt(D), q.stride(0), q.stride(1), q.stride(2),
            bmin.stride(0), bmin.stride(1), bmin.stride(2), bmin.stride(3), bscale.stride(0), bscale.stride(1), bscale.stride(2),
            table.stride(0), HKV=Hkv, GROUP=Hq // Hkv, DK=D, SBS=64, CBS=kc.shape[1], BLOCK_H=16, BLOCK_J=block_j, LSE=True,
            num_warps=warps, num_stages=stages)
        try:
            fn(); torch.cuda.synchronize()
            t = bsd.graph_time_ms(fn) * 1e3
            t8 = stacked(fn)
            fin = torch.isfinite(ref_out)
            rel = float(((out - ref_out).abs()[fin] / ref_out.abs()[fin].clamp(min=1e-6)).median())
            top_ref = ref_out.view(B * Hkv, -1).topk(128, dim=-1).indices.sort(-1).values
            top_new = out.view(B * Hkv, -1).topk(128, dim=-1).indices.sort(-1).values
            overlap = float(sum(len(set(a.tolist()) & set(b_.tolist())) for a, b_ in zip(top_ref, top_new)) / top_ref.numel())
            row = dict(B=B, L=L, block_j=block_j, warps=warps, repo_us=t_repo, repo_us_8=t_repo8, int8_us=t, int8_us_8=t8,
                       median_rel_diff=rel, top128_overlap=overlap)
        except Exception as e:
            row = dict(B=B, L=L, block_j=block_j, warps=warps, error=repr(e)[:400])
        res.append(row); print(row, flush=True)
    del q, kc, vc, index; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "bs_int8.json"), "w"), indent=1)
