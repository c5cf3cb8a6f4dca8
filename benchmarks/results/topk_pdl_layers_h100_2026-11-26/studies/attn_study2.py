"""Attention split-kernel study, B=8 64K budget 2048, Qwen3-8B shapes (device run)."""
import json, math, os, sys
import torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_attention as sa
from asynctls_tip_kernels import block_select as bs
from asynctls_tip_kernels.sparse_attention import _gathered_qk, _pdl_wait, sparse_attention_triton, attention_plan, AttentionWorkspace, _LOG2E
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton
from asynctls_tip_kernels import sparse_decode_reference as ref

OUT = os.environ.get("OUT", "/tmp")

@triton.jit
def _split_var(q_ptr, k_ptr, v_ptr, bt_ptr, pos_ptr, m_out_ptr, l_out_ptr, acc_out_ptr, qk_scale, P,
               stride_qb, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
               stride_vb, stride_vt, stride_vh, stride_vd, stride_btb, stride_pb, stride_ph,
               HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               CBS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DV: tl.constexpr, SPLIT_LEN: tl.constexpr, NUM_SPLITS: tl.constexpr,
               EARLY_V: tl.constexpr, PHYS: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        _pdl_wait()
    pid_bg = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bg // HKV
    g = pid_bg % HKV
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = g * GROUP + offs_h
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_dk = tl.arange(0, BLOCK_DK)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_dk[None, :] * stride_qd, mask=h_mask[:, None], other=0.0)
    pos_base = pos_ptr + b * stride_pb + g * stride_ph
    start = pid_s * SPLIT_LEN
    for n0 in range(0, SPLIT_LEN, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        pos = tl.load(pos_base + offs_n, mask=offs_n < P, other=-1)
        valid = pos >= 0
        pos_c = tl.where(valid, pos, 0)
        if PHYS:
            slot = pos_c.to(tl.int64)  # already phys * CBS + row
            phys = slot // CBS
            row = slot % CBS
        else:
            phys = tl.load(bt_ptr + b * stride_btb + pos_c // CBS, mask=valid, other=0).to(tl.int64)
            row = pos_c % CBS
        k_row = k_ptr + phys * stride_kb + row * stride_kt + g * stride_kh
        v_row = v_ptr + phys * stride_vb + row * stride_vt + g * stride_vh
        k = tl.load(k_row[:, None] + offs_dk[None, :] * stride_kd, mask=valid[:, None], other=0.0)
        if EARLY_V:
            v = tl.load(v_row[:, None] + offs_dv[None, :] * stride_vd, mask=valid[:, None], other=0.0)
        s = tl.dot(q.to(k.dtype), tl.trans(k))
        s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not EARLY_V:
            v = tl.load(v_row[:, None] + offs_dv[None, :] * stride_vd, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out_row = (b * HQ + heads) * NUM_SPLITS + pid_s
    tl.store(m_out_ptr + out_row, m_i, mask=h_mask)
    tl.store(l_out_ptr + out_row, l_i, mask=h_mask)
    tl.store(acc_out_ptr + out_row[:, None] * DV + offs_dv[None, :], acc, mask=h_mask[:, None])


def variant(query, kc, vc, table, positions, scale, out, ws_cache, early_v, phys, block_n, warps, stages, per_sm, maxnreg=None):
    B, Hq, Dk = query.shape
    Hkv = kc.shape[2]; Dv = vc.shape[3]; P = positions.shape[2]
    old = sa.ATTN_PROGRAMS_PER_SM, sa.ATTN_BLOCK_N
    sa.ATTN_PROGRAMS_PER_SM, sa.ATTN_BLOCK_N = per_sm, block_n
    plan = attention_plan(B, Hq, Hkv, P, Dk, Dv)
    sa.ATTN_PROGRAMS_PER_SM, sa.ATTN_BLOCK_N = old
    key = plan["NUM_SPLITS"]
    if key not in ws_cache:
        ws_cache[key] = AttentionWorkspace(B, Hq, key, Dv, query.device)
    ws = ws_cache[key]
    grid = (B * Hkv, plan["head_blocks"], plan["NUM_SPLITS"])
    def fn():
        _split_var[grid](query, kc, vc, table, positions, ws.m, ws.l, ws.acc, float(scale) * _LOG2E, P,
            query.stride(0), query.stride(1), query.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
            vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3), table.stride(0),
            positions.stride(0), positions.stride(1),
            HQ=Hq, HKV=Hkv, GROUP=Hq // Hkv, DK=Dk, DV=Dv, CBS=kc.shape[1],
            BLOCK_H=plan["BLOCK_H"], BLOCK_N=block_n, BLOCK_DK=128, BLOCK_DV=128,
            SPLIT_LEN=plan["SPLIT_LEN"], NUM_SPLITS=plan["NUM_SPLITS"], EARLY_V=early_v, PHYS=phys, PDL=False,
            num_warps=warps, num_stages=stages, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
        sa._sparse_attn_merge_kernel[(B * Hq,)](ws.m, ws.l, ws.acc, out, out.stride(0), out.stride(1), out.stride(2),
            HQ=Hq, DV=Dv, BLOCK_DV=128, NUM_SPLITS=plan["NUM_SPLITS"],
            BLOCK_S=triton.next_power_of_2(plan["NUM_SPLITS"]), PDL=False, num_warps=4)
        return out
    return fn, plan


def main():
    res = dict(device=torch.cuda.get_device_name(0), rows=[])
    bw = bsd.copy_bandwidth()
    res["copy_TBps"] = bw / 1e12
    print("copy", bw / 1e12, flush=True)
    B, L, budget = 8, 65536, 2048
    Hq, Hkv, D = 32, 8, 128
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget)
    q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
    scale = 1 / math.sqrt(D)
    ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], bsd.CACHE_BLOCK, config, q.dtype, "cuda")
    sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=ws)
    real = ws.positions.clone()
    P = real.shape[2]
    contiguous = torch.arange(P, device="cuda", dtype=torch.int32).expand(B, Hkv, P).contiguous()
    rnd = torch.stack([torch.randperm(L, device="cuda")[:P].sort().values for _ in range(B * Hkv)]).view(B, Hkv, P).to(torch.int32)
    def to_phys(pos):
        p = pos.long()
        ph = table.long().gather(1, (p.clamp(min=0) // bsd.CACHE_BLOCK).view(B, -1)).view(B, Hkv, P)
        return torch.where(pos >= 0, ph * bsd.CACHE_BLOCK + p % bsd.CACHE_BLOCK, -1).to(torch.int32).contiguous()
    out = torch.empty(B, Hq, D, dtype=q.dtype, device="cuda")
    want = ref.sparse_attention(q, kc, vc, table, real, scale)
    bytes_attn = B * Hkv * P * D * 2 * 2
    def rec(name, ms, extra=None):
        row = dict(name=name, us=ms * 1e3, TBps=bytes_attn / (ms * 1e-3) / 1e12, **(extra or {}))
        res["rows"].append(row)
        print(f"{name}: {ms*1e3:.2f} us {row['TBps']:.2f} TB/s {extra or ''}", flush=True)
    wsA = AttentionWorkspace(B, Hq, attention_plan(B, Hq, Hkv, P, D, D)["NUM_SPLITS"], D, "cuda")
    for name, pos in (("repo_real", real),):
        rec(name, bsd.graph_time_ms(lambda: sparse_attention_triton(q, kc, vc, table, pos, scale, out=out, workspace=wsA)))
    # dense through our kernel (all L positions) for its streaming bandwidth
    cache = {}
    for block_n, warps, stages, per_sm, maxnreg in ((32, 4, 2, 16, None), (32, 4, 2, 16, 64), (32, 4, 2, 16, 72),
                                                    (32, 4, 2, 24, 64), (32, 4, 2, 32, 64), (32, 2, 2, 16, None),
                                                    (32, 2, 2, 32, None), (32, 2, 2, 32, 96), (16, 2, 2, 32, None),
                                                    (32, 4, 1, 16, 64), (32, 4, 3, 16, 64), (64, 4, 2, 16, 64)):
        try:
            fn, plan = variant(q, kc, vc, table, real, scale, out, cache, False, False, block_n, warps, stages, per_sm, maxnreg)
            got = fn().float()
            err = float((got - want.float()).abs().max())
            ms = bsd.graph_time_ms(fn)
            rec(f"var n={block_n} w={warps} st={stages} psm={per_sm} maxnreg={maxnreg}", ms,
                dict(err=err, splits=plan["NUM_SPLITS"], n_regs=getattr(fn, "n_regs", None)))
        except Exception as e:
            print("fail", block_n, warps, stages, per_sm, maxnreg, repr(e)[:300], flush=True)
    # topk stages alone
    n_sel = ws.num_selection_blocks
    res["block_topk_us"] = bsd.graph_time_ms(lambda: bs.topk_rows(ws.block_scores.view(B * Hkv, n_sel), 128, out=ws.block_ids.view(B * Hkv, -1))) * 1e3
    res["token_topk_us"] = bsd.graph_time_ms(lambda: bs.topk_rows(ws.token_scores.view(B * Hkv, -1), budget,
        out=ws.positions.view(B * Hkv, -1), block_map=ws.block_ids.view(B * Hkv, -1), map_block_size=64,
        seq_lens=seq_lens, sink_tokens=config.sink_tokens, local_tokens=config.local_tokens, rows_per_seq=Hkv)) * 1e3
    res["whole_us"] = bsd.graph_time_ms(lambda: sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=ws)) * 1e3
    print("topk", res["block_topk_us"], res["token_topk_us"], "whole", res["whole_us"], flush=True)
    json.dump(res, open(os.path.join(OUT, "attn_study.json"), "w"), indent=1)

main()
