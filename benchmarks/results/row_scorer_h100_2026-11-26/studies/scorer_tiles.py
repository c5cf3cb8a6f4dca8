"""The token scorer with a few tiles per program and a software pipeline over them (the attention gained
from pipelining its dependent loads across tiles: position -> block table -> rows; the scorer's chain is
block id -> block table -> codes): programs of TILES tiles of 32 x warps x SUB candidates, 2-3 stages, against
the shipped scorer (one tile of 256 candidates per program). B=8, 64K, budget 2048; scores compared bit for
bit; each timed alone, 4 layers' data in one graph (none L2-warm)."""
import json, math, os, sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import token_select as ts, block_select as bs, sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode_reference import group_temperature
OUT = os.environ.get("OUT", "/tmp")


@triton.jit
def _row_scores_kernel(iq_ptr, codes_ptr, scales_ptr, bt_ptr, seq_lens_ptr, block_ids_ptr, scores_ptr, NB, SINK, LOCAL,
                       TEMP, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, stride_btb,
                       HKV: tl.constexpr, GROUP: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                       SBS: tl.constexpr, CBS: tl.constexpr, BLOCK_H: tl.constexpr, SUB: tl.constexpr,
                       T: tl.constexpr, TILES: tl.constexpr, LSE: tl.constexpr, ASM: tl.constexpr,
                       PAIRS: tl.constexpr, STATIC: tl.constexpr):
    pid = tl.program_id(0)
    t0 = tl.program_id(1) * TILES
    b = pid // HKV
    g = pid % HKV
    L = tl.load(seq_lens_ptr + b)
    h_mask = tl.arange(0, BLOCK_H) < GROUP
    if STATIC:
        for t in tl.static_range(TILES):
            _row_tile(t0 + t, pid, b, g, L, h_mask, iq_ptr, codes_ptr, scales_ptr, bt_ptr, block_ids_ptr, scores_ptr, NB, SINK,
                      LOCAL, TEMP, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, stride_btb, C,
                      BITS, SBS, CBS, BLOCK_H, SUB, T, LSE, ASM, PAIRS)
    else:
        for t in range(TILES):
            _row_tile(t0 + t, pid, b, g, L, h_mask, iq_ptr, codes_ptr, scales_ptr, bt_ptr, block_ids_ptr, scores_ptr, NB, SINK,
                      LOCAL, TEMP, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, stride_btb, C,
                      BITS, SBS, CBS, BLOCK_H, SUB, T, LSE, ASM, PAIRS)


@triton.jit
def _row_tile(t, pid, b, g, L, h_mask, iq_ptr, codes_ptr, scales_ptr, bt_ptr, block_ids_ptr, scores_ptr, NB, SINK, LOCAL,
              TEMP, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, stride_btb, C: tl.constexpr,
              BITS: tl.constexpr, SBS: tl.constexpr, CBS: tl.constexpr, BLOCK_H: tl.constexpr, SUB: tl.constexpr,
              T: tl.constexpr, LSE: tl.constexpr, ASM: tl.constexpr, PAIRS: tl.constexpr):
    offs_c = t * (SUB * T) + (tl.arange(0, SUB)[:, None] + tl.arange(0, T)[None, :] * SUB)
    in_row = offs_c < NB * SBS
    blk = tl.load(block_ids_ptr + pid * NB + offs_c // SBS, mask=in_row, other=-1)
    pos = blk * SBS + offs_c % SBS
    cand = in_row & (blk >= 0) & (pos < L) & (pos >= SINK) & (pos < L - LOCAL)
    pos_c = tl.where(cand, pos, 0)
    phys = tl.load(bt_ptr + b * stride_btb + pos_c // CBS, mask=cand, other=0).to(tl.int64)
    row = pos_c % CBS
    score = ts._word_scores(iq_ptr + pid * (C * BLOCK_H), h_mask, codes_ptr, scales_ptr, g, phys, row, cand, TEMP,
                            stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, C, BITS, BLOCK_H, LSE, ASM,
                            PAIRS)
    tl.store(scores_ptr + pid * (NB * SBS) + offs_c, score, mask=in_row)


Hq, Hkv, D, B, LAYERS, L = 32, 8, 128, 8, 4, 65536
SCALE = 1 / math.sqrt(D)
cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
ids = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
heads = ts.word_score_heads(cfg, Hq // Hkv)
iqs = [ts.build_index_query(s[0], s[5].channel_ids, cfg.index_bits, heads) for s in stack]
N = cfg.num_blocks * 64
outs = [torch.empty(B, Hkv, N, device="cuda") for _ in range(LAYERS)]


def shipped(i):
    q, kc, vc, table, seq_lens, index = stack[i]
    return ts.token_scores_triton(q, index, kc, table, seq_lens, ids[i], cfg, out=outs[i], softmax_scale=SCALE,
                                  index_query=iqs[i])


def row_version(i, warps, sub, static, stages, tiles):
    q, kc, vc, table, seq_lens, index = stack[i]
    cs = tuple(st // 4 for st in index.codes.stride()[:3])
    ss = index.scales.stride()
    T = 32 * warps
    _row_scores_kernel[(B * Hkv, triton.cdiv(N, sub * T * tiles))](
        iqs[i], index.codes, index.scales, table, seq_lens, ids[i], outs[i], cfg.num_blocks, cfg.sink_tokens,
        cfg.local_tokens, group_temperature(SCALE, D), cs[0], cs[1], cs[2], ss[0], ss[1], ss[2], table.stride(0),
        HKV=Hkv, GROUP=Hq // Hkv, C=cfg.index_channels, BITS=cfg.index_bits, SBS=64, CBS=kc.shape[1], BLOCK_H=heads,
        SUB=sub, T=T, TILES=tiles, LSE=True, ASM=True, PAIRS=True, STATIC=static,
        num_warps=warps, num_stages=stages)
    return outs[i]


want = shipped(0).clone()
res = []
us = bsd.stacked_time_ms([(lambda i=i: shipped(i)) for i in range(LAYERS)]) * 1e3
res.append(dict(variant="shipped scorer (2048 programs)", us=round(us, 2))); print(res[-1], flush=True)
for warps, sub in ((4, 2), (4, 1), (8, 1)):
    for tiles in (1, 2, 4):
        for stages in (1, 2, 3):
            try:
                got = row_version(0, warps, sub, False, stages, tiles)
                eq = bool(torch.equal(got, want))
                us = bsd.stacked_time_ms([(lambda i=i: row_version(i, warps, sub, False, stages, tiles))
                                          for i in range(LAYERS)]) * 1e3
                row = dict(variant="tiles per program", warps=warps, sub=sub, tiles=tiles, stages=stages, equal=eq,
                           us=round(us, 2))
            except Exception as e:
                row = dict(variant="tiles per program", warps=warps, sub=sub, tiles=tiles, stages=stages, error=str(e)[:160])
            res.append(row); print(row, flush=True)
us = bsd.stacked_time_ms([(lambda i=i: shipped(i)) for i in range(LAYERS)]) * 1e3
res.append(dict(variant="shipped scorer again", us=round(us, 2))); print(res[-1], flush=True)
json.dump(res, open(os.path.join(OUT, "scorer_tiles.json"), "w"), indent=1)
raise SystemExit
tk = [torch.empty(B * Hkv, cfg.attended_tokens, dtype=torch.int32, device="cuda") for _ in range(LAYERS)]
us = bsd.stacked_time_ms([(lambda i=i: bs.topk_rows(outs[i].view(B * Hkv, N), cfg.token_budget, out=tk[i],
                                                    block_map=ids[i].view(B * Hkv, -1), map_block_size=64,
                                                    seq_lens=stack[i][4], sink_tokens=64, local_tokens=64,
                                                    rows_per_seq=Hkv)) for i in range(LAYERS)]) * 1e3
res.append(dict(variant="shipped token top-k alone", us=round(us, 2))); print(res[-1], flush=True)
json.dump(res, open(os.path.join(OUT, "row_scorer.json"), "w"), indent=1)
