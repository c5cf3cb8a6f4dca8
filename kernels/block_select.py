"""Stage 1 of AsyncTLS on the GPU: block bound scoring over every selection block, then top-k.

Design
- `_block_score_kernel`: one program per (sequence, kv head, tile of BLOCK_J selection blocks). The
  Quest bound `sum_d max(q_d min_d, q_d max_d)` equals `q+ . max + q- . min`, two small matrix
  products (the group's q heads x the tile's summaries), so the summaries are read once per kv head and
  the group's heads share them. Summaries are int8 codes with one float32 scale per (selection block,
  kv head) (`SparseIndex`): the products run on the codes, converted to the query dtype (exact in
  bf16 / fp16 for |c| <= 127; float32 queries take the IEEE float32 path), and each block's bound is
  multiplied by its scale at the end (min and max share it): half the bytes of bf16 summaries. The
  group score combines its heads by `config.group_score` ("lse": `max + log(sum_h exp(t (s_h -
  max))) / t` with t the softmax scale; "max"). Blocks past the sequence, or wholly inside the sink
  region or the local window, score -inf (they are attended anyway). A tile that starts past the row's
  candidates writes -inf without loading any summary (vLLM's block tables are as wide as the longest
  context the model allows, and its batches are padded with empty rows). In the decode step the first
  program of each row also writes the token stage's index query (`token_select.build_index_query`:
  the group's q heads on the index channels), so the word path needs no launch of its own.
- `topk_rows`: one program per row finds the k-th largest score on the order-preserving integer image
  of the float32 scores (held in registers) by a bracketing search, one counting reduction per pass:
  a first guess from a normal fit of the row (mean + z sd), Newton steps on that fit's density while
  one end of the bracket is still the row's extreme, then interpolation on the count between the
  bracket's ends (a handful of passes on real score rows), and integer bisection as the exact
  fallback. It then compacts the indices
  above the threshold (ties broken by lowest index) into ascending order. Output is fixed-size with -1
  padding: no sort, no host synchronisation, CUDA-graph safe (the pass count varies per row on the
  device, the launch does not). Rows up to 32K entries fit one program.
- Returned ids are ascending: the set equals the reference's top-k (ties aside); order carries no
  meaning downstream (attention is permutation invariant), and ascending ids make the later gathers
  walk the cache in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attention import _pdl_trigger, _pdl_wait, float32_dots, pdl_launch, require_triton_device
from .index_basis import rotate_query_triton
from .sparse_decode_reference import group_temperature

# Launch tunables (measured on the H100, see benchmarks/bench_sparse_decode.py --sweep).
BLOCK_SCORE_TILE = 128  # selection blocks per program (group of <= 32 q heads)
BLOCK_SCORE_WARPS = 4
BLOCK_SCORE_DK = 64  # key channels per step (< head dim: a pipelined loop over chunks)
BLOCK_SCORE_STAGES = 2
BLOCK_SCORE_MAXNREG = None  # register cap per thread for the block scorer (None: the compiler's choice)
# Wide keys (at least BLOCK_SCORE_WIDE_MIN_DK = 512 channels, 8 or more chunks of 64; MLA's latent + rope: 576, 9)
# with up to 32 heads per program and 16-bit queries: 64 blocks per program and a 4-stage pipeline over the
# chunks. H200, latent 576, B=16, the whole operator step from a CUDA graph (`benchmarks/RESULTS.md`,
# 2026-11-27), positions unchanged: 16 heads (DeepSeek-V2-Lite) 32K 87.7 -> 80.4 us, 64K 92.0 -> 85.3 us; 20
# heads (GLM-style) 32K 146.8 -> 139.0 us. Not measured, so on the shipped tile: float32 queries.
BLOCK_SCORE_WIDE_MIN_DK = 512
BLOCK_SCORE_WIDE_TILE = 64
BLOCK_SCORE_WIDE_STAGES = 4
TOPK_INTERP_PASSES = 24  # value-space passes (model guesses, interpolation) before integer bisection
TOPK_WARPS_SMALL = 4  # warps for rows of up to 2048 entries
TOPK_WARPS_LARGE = 8  # warps for rows of more than 2048 entries (H100 sweep: 8 < 16 < 32 us)


@triton.jit
def _combine_heads(s, TEMP, LSE: tl.constexpr):
    # s: (BLOCK_H, N) float32 per-head scores, -inf on padded head rows (at least one row is real).
    # Returns (N,): max_h s ("max") or max + log(sum_h exp(TEMP (s_h - max))) / TEMP ("lse").
    top = tl.max(s, axis=0)
    if LSE:
        top = top + tl.log(tl.sum(tl.exp((s - top[None, :]) * TEMP), axis=0)) / TEMP
    return top


@triton.jit
def _write_index_query(q_row, ch_row, iq_row, stride_qh, stride_qd, GROUP: tl.constexpr, IQ_C: tl.constexpr,
                       IQ_H: tl.constexpr, IQ_BITS: tl.constexpr, IQ_BLOCK_C: tl.constexpr):
    # iq[c, h] = q[h, ch[c]] * 2^(-IQ_BITS (c % (16 / IQ_BITS))), 0 for h >= GROUP: one (sequence, kv head)
    # of token_select.build_index_query, from the group's first q head `q_row` and its channels `ch_row`.
    offs_c = tl.arange(0, IQ_BLOCK_C)
    c_mask = offs_c < IQ_C
    offs_hq = tl.arange(0, IQ_H)
    ch = tl.load(ch_row + offs_c, mask=c_mask, other=0)
    qv = tl.load(q_row + offs_hq[None, :] * stride_qh + ch[:, None] * stride_qd,
                 mask=c_mask[:, None] & (offs_hq < GROUP)[None, :], other=0.0).to(tl.float32)
    step = (1 << (IQ_BITS * (offs_c % (16 // IQ_BITS)))).to(tl.float32)
    tl.store(iq_row + offs_c[:, None] * IQ_H + offs_hq[None, :], qv / step[:, None], mask=c_mask[:, None])


@triton.jit
def _block_score_kernel(
    q_ptr,  # query dtype, (B, Hq, DK), any strides
    bmin_ptr,  # int8, (num_cache_blocks, CBS // SBS, Hkv, DK), any strides: codes of the min
    bmax_ptr,  # int8, same shape and strides as bmin: codes of the max
    bscale_ptr,  # float32, (num_cache_blocks, CBS // SBS, Hkv), any strides: one scale per summary row
    bt_ptr,  # int32, (B, max_blocks_per_seq)
    seq_lens_ptr,  # int32, (B,)
    scores_ptr,  # float32, (B, Hkv, N_SEL) contiguous: group bound per selection block, -inf = not a candidate
    ch_ptr,  # int64, (Hkv, IQ_C) contiguous: index channels (IQ only)
    iq_ptr,  # float32, (B, Hkv, IQ_C, IQ_H) contiguous: out, the token stage's index query (IQ only)
    N_SEL,  # int: selection blocks per row of scores (>= cdiv(max seq len, SBS))
    SINK,  # int: sink tokens
    LOCAL,  # int: local window tokens
    TEMP,  # float: the "lse" temperature (softmax scale), > 0; unused with LSE = False
    BOUND_W,  # float: config.block_bound_weight (only if MID)
    stride_qb, stride_qh, stride_qd,
    stride_mb, stride_ms, stride_mh, stride_md,
    stride_sb, stride_ss, stride_sh,
    stride_btb,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    DK: tl.constexpr,
    SBS: tl.constexpr,  # selection block size
    CBS: tl.constexpr,  # cache block size (multiple of SBS)
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    IEEE: tl.constexpr,
    LSE: tl.constexpr,  # group_score "lse" (else "max")
    EVEN_DK: tl.constexpr,  # BLOCK_DK divides DK: no channel mask (vectorised loads)
    PDL: tl.constexpr,  # programmatic dependent launch: wait for the previous kernel first
    MID: tl.constexpr,  # block_bound_weight < 1: blend the bound with the midpoint's score
    IQ: tl.constexpr,  # also write the index query (token_select.build_index_query) from the first program of a row
    IQ_C: tl.constexpr,
    IQ_H: tl.constexpr,
    IQ_BITS: tl.constexpr,
    IQ_BLOCK_C: tl.constexpr,
):
    # bound[h, j] = sum_d max(q[h,d] * min[j,d], q[h,d] * max[j,d]) = q+[h] . max[j] + q-[h] . min[j]
    #             = scale[j] * (q+[h] . cmax[j] + q-[h] . cmin[j])   (min = cmin * scale, cmin int8 codes)
    # with MID (w = BOUND_W < 1): bound[h, j] <- w bound[h, j] + (1 - w) / 2 scale[j] q[h] . (cmin[j] + cmax[j])
    # score[j] = max_{h in group} bound[h, j]                                          ("max")
    #          = m + log(sum_{h in group} exp(TEMP (bound[h, j] - m))) / TEMP, m the max  ("lse");
    # -inf unless block j (tokens [j*SBS, (j+1)*SBS)) holds a
    # candidate position, i.e. one in [SINK, L - LOCAL).
    if PDL:
        _pdl_wait(PDL)
    pid_bg = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    L = tl.load(seq_lens_ptr + b)

    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    if IQ:
        if pid_j == 0:
            _write_index_query(q_ptr + b * stride_qb + g * GROUP * stride_qh, ch_ptr + g * IQ_C, iq_ptr + pid_bg * IQ_C * IQ_H,
                               stride_qh, stride_qd, GROUP, IQ_C, IQ_H, IQ_BITS, IQ_BLOCK_C)
    if pid_j * (BLOCK_J * SBS) >= L - LOCAL:
        # The whole tile lies past the row's candidates: vLLM sizes the block table by the longest
        # context the model allows and pads the batch with empty rows, so many tiles are. Their
        # blocks score -inf without loading any summary.
        tl.store(scores_ptr + pid_bg * N_SEL + offs_j, tl.full((BLOCK_J,), float("-inf"), tl.float32),
                 mask=offs_j < N_SEL)
        return
    first = offs_j * SBS
    # The candidates are [SINK, L - LOCAL); block j holds one iff max(j S, SINK) < min(j S + S, L - LOCAL)
    # (this also drops blocks past the sequence).
    candidate = (offs_j < N_SEL) & (tl.maximum(first, SINK) < tl.minimum(first + SBS, L - LOCAL))

    j_c = tl.where(candidate, offs_j, 0)
    phys = tl.load(bt_ptr + b * stride_btb + (j_c * SBS) // CBS, mask=candidate, other=0).to(tl.int64)
    sub = (j_c * SBS % CBS) // SBS
    row_off = phys * stride_mb + sub * stride_ms + g * stride_mh  # (BLOCK_J,)
    scale = tl.load(bscale_ptr + phys * stride_sb + sub * stride_ss + g * stride_sh, mask=candidate, other=0.0)

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    q_base = q_ptr + b * stride_qb + (g * GROUP + offs_h)[:, None] * stride_qh

    s = tl.zeros((BLOCK_H, BLOCK_J), tl.float32)
    s_mid = tl.zeros((BLOCK_H, BLOCK_J), tl.float32)
    for d0 in range(0, DK, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        d_mask = offs_d < DK
        if EVEN_DK:
            q = tl.load(q_base + offs_d[None, :] * stride_qd, mask=h_mask[:, None], other=0.0)
            m_mask = candidate[:, None]
        else:
            q = tl.load(q_base + offs_d[None, :] * stride_qd, mask=h_mask[:, None] & d_mask[None, :], other=0.0)
            m_mask = candidate[:, None] & d_mask[None, :]
        mn = tl.load(bmin_ptr + row_off[:, None] + offs_d[None, :] * stride_md, mask=m_mask, other=0)
        mx = tl.load(bmax_ptr + row_off[:, None] + offs_d[None, :] * stride_md, mask=m_mask, other=0)
        q_dtype = q.dtype
        q = q.to(tl.float32)
        q_pos = tl.maximum(q, 0.0)  # a sign mask of q: exact back in the query dtype
        q_neg = tl.minimum(q, 0.0)
        if IEEE:
            s += tl.dot(q_pos, tl.trans(mx.to(tl.float32)), input_precision="ieee")
            s += tl.dot(q_neg, tl.trans(mn.to(tl.float32)), input_precision="ieee")
            if MID:
                s_mid += tl.dot(q, tl.trans(mx.to(tl.float32) + mn.to(tl.float32)), input_precision="ieee")
        else:  # int8 codes are exact in bf16 / fp16 (|c| <= 127), and so are their sums (|c| <= 254)
            s += tl.dot(q_pos.to(q_dtype), tl.trans(mx.to(q_dtype)))
            s += tl.dot(q_neg.to(q_dtype), tl.trans(mn.to(q_dtype)))
            if MID:
                s_mid += tl.dot(q.to(q_dtype), tl.trans((mx.to(tl.int16) + mn.to(tl.int16)).to(q_dtype)))
    _pdl_trigger(PDL)
    if MID:
        s = BOUND_W * s + (0.5 * (1.0 - BOUND_W)) * s_mid
    s = s * scale[None, :]
    s = tl.where(h_mask[:, None], s, float("-inf"))
    score = _combine_heads(s, TEMP, LSE)
    score = tl.where(candidate, score, float("-inf"))
    tl.store(scores_ptr + pid_bg * N_SEL + offs_j, score, mask=offs_j < N_SEL)


@triton.jit
def _key_to_float(k):
    # Inverse of key(x) = bits(x) ^ (sign(x) ? 0x7FFFFFFF : 0) (the map is an involution).
    k32 = k.to(tl.int32)
    return (k32 ^ ((k32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _float_to_key(x):
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _count_min_max(c0, a0, b0, c1, a1, b1):
    return c0 + c1, tl.minimum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def _count_min_max_sums(c0, a0, b0, s0, q0, c1, a1, b1, s1, q1):
    return c0 + c1, tl.minimum(a0, a1), tl.maximum(b0, b1), s0 + s1, q0 + q1


@triton.jit
def _upper_normal_quantile(p):
    # z with P(Z > z) = p for a standard normal Z, p in (0, 1) (Abramowitz & Stegun 26.2.23, |error| < 4.5e-4).
    q = tl.minimum(p, 1.0 - p)
    t = tl.sqrt(-2.0 * tl.log(q))
    z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
    return tl.where(p < 0.5, z, -z)


@triton.jit
def _topk_rows_kernel(
    scores_ptr,  # float32, (R, N) contiguous; -inf = not a candidate
    out_ptr,  # int32, (R, OUT_WIDTH) contiguous: [sinks, local window,] chosen indices ascending, -1 padding
    map_ptr,  # int32, (R, N // SBS) contiguous: block id per candidate group (only if MAP_BLOCKS)
    seq_lens_ptr,  # int32, (R // HKV,): sequence lengths (only if SINK + LOCAL > 0)
    N,  # int: entries per row
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= max(N, K)
    MAP_BLOCKS: tl.constexpr,  # write map[i // SBS] * SBS + i % SBS instead of i
    SBS: tl.constexpr,
    SINK: tl.constexpr,  # > 0: also write the attended sink slots (reference `attended_positions`)
    LOCAL: tl.constexpr,  # > 0: also write the attended local-window slots
    HKV: tl.constexpr,  # rows per sequence (for seq_lens)
    BLOCK_P: tl.constexpr,  # next power of two >= max(SINK, LOCAL)
    INTERP_PASSES: tl.constexpr,  # value-space passes before plain integer bisection takes over
    PDL: tl.constexpr,  # programmatic dependent launch (sm90+): wait for the previous kernel here
):
    # key(x) = bits(x) ^ (sign(x) ? 0x7FFFFFFF : 0) orders float32 like the floats themselves.
    # T = the K-th largest valid key, found by a bracketing search on keys, one reduction per pass
    # (count of keys >= threshold, nearest key on each side of it). Invariant: lo and hi - 1 are keys
    # of the row and count(key >= lo) >= K > count(key >= hi). Any threshold strictly inside the
    # bracket keeps the invariant, so the guesses below only decide how fast it ends, never the result:
    # - pass 0: the normal model of the row, mean + z sd with P(Z > z) = K / n_valid (mean and sd come
    #   with the first reduction);
    # - while one end is still the row's extreme: a Newton step from the last threshold,
    #   (count - K) / density, with the model's density at its K-quantile (computed once);
    # - then linear interpolation of the count between the ends, in value space;
    # - an end that counts K - 1 or K + 1 tries the key next to it, which counts exactly K unless repeated
    #   (the benchmark's token rows at K = 2048: 4.23 -> 3.77 passes on average, 7.75 -> 6.5 at most per
    #   launch of 64 rows; the slowest row sets a launch's time).
    # The moved end snaps to the nearest key. A guess that falls outside the bracket becomes the
    # interpolation guess; after INTERP_PASSES, or when that is not strictly inside either, integer
    # bisection (<= 32 more passes) guarantees the exact K-th key. It stops early when a threshold
    # counts exactly K (keeping key >= threshold is then the exact top-K). Simulated passes (8 rows
    # each), this search vs interpolation from the extremes alone: benchmark block bounds 2-5 vs 6-9,
    # token scores 3-6 vs 5-8; heavy tails at K = 128 of 8192: Gumbel 4-8 vs 22-37, log-normal
    # 10-16 vs 34-38, Student-t(3) 5-10 vs 14-22. Keep every key > T, then the lowest-index ties
    # key == T until K are kept. Fewer than K valid entries: keep them all.
    if PDL:
        _pdl_wait(PDL)
    OUT_WIDTH: tl.constexpr = SINK + LOCAL + K
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * OUT_WIDTH
    if SINK + LOCAL > 0:
        L = tl.load(seq_lens_ptr + row // HKV)
        offs_p = tl.arange(0, BLOCK_P)
        if SINK > 0:
            tl.store(out_row + offs_p, tl.where(offs_p < L, offs_p, -1), mask=offs_p < SINK)
        if LOCAL > 0:
            loc = L - LOCAL + offs_p
            tl.store(out_row + SINK + offs_p, tl.where(loc >= SINK, loc, -1), mask=offs_p < LOCAL)
        out_row += SINK + LOCAL
    offs = tl.arange(0, BLOCK_N)
    in_row = offs < N
    x = tl.load(scores_ptr + row * N + offs, mask=in_row, other=float("-inf"))
    if MAP_BLOCKS:
        # One load per candidate group (broadcast over its SBS entries at the end), issued before the search.
        offs_g = tl.arange(0, BLOCK_N // SBS)
        blk = tl.load(map_ptr + row * (N // SBS) + offs_g, mask=offs_g < N // SBS, other=0)
    valid = in_row & (x > float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    # Invalid entries get INT32_MIN, below every threshold tried (thresholds > lo >= min valid key >
    # INT32_MIN: the most negative finite float maps to 0x80800000), so the counts need no mask.
    key32 = tl.where(valid, bits ^ ((bits >> 31) & 0x7FFFFFFF), -2147483648)
    xv = tl.where(valid, x, 0.0)
    n_valid, lo32, hi32, x_sum, x_sq = tl.reduce(
        (valid.to(tl.int32), tl.where(valid, key32, 2147483647), key32, xv, xv * xv), 0, _count_min_max_sums)

    lo = lo32.to(tl.int64)
    hi = hi32.to(tl.int64) + 1
    cnt_lo = n_valid
    cnt_hi = n_valid * 0
    it = n_valid * 0
    searching = n_valid > K
    # The row's normal model (only a guess: see above).
    n_f = tl.maximum(n_valid, 1).to(tl.float32)
    mean = x_sum / n_f
    sd = tl.sqrt(tl.maximum(x_sq / n_f - mean * mean, 0.0))
    z = _upper_normal_quantile(tl.minimum(tl.maximum(K / n_f, 1e-6), 1.0 - 1e-6))
    density = n_f * tl.exp(-0.5 * z * z) * 0.3989422804014327 / tl.maximum(sd, 1e-30)
    last = mean + z * sd  # the threshold tried last (pass 0: the model's guess)
    cnt = n_valid * 0 + K  # count at `last` (pass 0: no Newton step)
    lo_moved = n_valid < 0
    hi_moved = n_valid < 0
    while searching:
        # lo and hi - 1 are always keys of the row (snapped); +inf scores make lo_f / hi_f infinite, and
        # the guesses then fall outside the bracket, leaving the pass to integer bisection.
        lo_f = _key_to_float(lo)
        hi_f = _key_to_float(hi - 1)
        frac = (cnt_lo - K).to(tl.float32) / (cnt_lo - cnt_hi).to(tl.float32)
        frac = tl.minimum(tl.maximum(frac, 1.0 / 64), 63.0 / 64)
        lin = _float_to_key(lo_f + (hi_f - lo_f) * frac)
        guess = tl.where(lo_moved & hi_moved, lin, _float_to_key(last + (cnt - K).to(tl.float32) / density))
        # An end one count from K pins the K-th key: hi - 1 (count K - 1 at hi) and lo + 1 (count K + 1
        # at lo) each count exactly K unless that end's key is repeated.
        guess = tl.where(hi_moved & (cnt_hi == K - 1), hi - 1, tl.where(lo_moved & (cnt_lo == K + 1), lo + 1, guess))
        mid = tl.where((guess <= lo) | (guess >= hi), lin, guess)
        use_int = (it >= INTERP_PASSES) | (mid <= lo) | (mid >= hi)
        mid = tl.where(use_int, (lo + hi) >> 1, mid)
        mid32 = mid.to(tl.int32)
        ge = key32 >= mid32
        cnt, above_min, below_max = tl.reduce(
            (ge.to(tl.int32), tl.where(ge, key32, 2147483647), tl.where(ge, -2147483648, key32)), 0,
            _count_min_max)
        take = cnt >= K
        last = _key_to_float(mid)
        # Snap to the nearest keys on each side: no key lies in [mid, above_min) or (below_max, mid).
        lo = tl.where(take, above_min.to(tl.int64), lo)
        cnt_lo = tl.where(take, cnt, cnt_lo)
        hi = tl.where(take, hi, below_max.to(tl.int64) + 1)
        cnt_hi = tl.where(take, cnt_hi, cnt)
        lo_moved = lo_moved | take
        hi_moved = hi_moved | (~take)
        it += 1
        searching = (hi - lo > 1) & (cnt_lo != K)
    _pdl_trigger(PDL)
    # T as an int32 key; INT32_MIN (below every valid key) keeps every valid entry when there are <= K.
    t32 = tl.where(n_valid <= K, -2147483648, lo).to(tl.int32)
    if (cnt_lo == K) | (n_valid <= K):
        keep = valid & (key32 >= t32)  # exactly K (or all): no tie to break, no second scan
    else:
        above = valid & (key32 > t32)
        n_above = tl.sum(above.to(tl.int32), axis=0)
        tie = valid & (key32 == t32)
        tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based among ties
        keep = above | (tie & (tie_rank <= K - n_above))
    # Output slot of each kept entry: a scan inside rows of 32 entries, then across the rows' totals
    # (H100, token row of 8192: 1.2 us less than one scan over the whole row).
    keep_rows = tl.reshape(keep.to(tl.int32), (BLOCK_N // 32, 32))
    row_totals = tl.sum(keep_rows, axis=1)
    before = tl.cumsum(row_totals, axis=0) - row_totals
    slot = tl.reshape(tl.cumsum(keep_rows, axis=1) + before[:, None], (BLOCK_N,)) - 1
    if MAP_BLOCKS:
        val = tl.reshape(blk[:, None] * SBS + tl.arange(0, SBS)[None, :], (BLOCK_N,))
    else:
        val = offs
    tl.store(out_row + slot, val.to(tl.int32), mask=keep)
    # BLOCK_N >= K, so `offs` also covers the output slots; padding and kept slots are disjoint.
    n_keep = tl.minimum(n_valid, K)
    tl.store(out_row + offs, tl.full((BLOCK_N,), -1, tl.int32), mask=(offs >= n_keep) & (offs < K))


TOPK_MAX_ROW = 32768


def topk_rows(scores: torch.Tensor, k: int, out: torch.Tensor | None = None,
              block_map: torch.Tensor | None = None, map_block_size: int = 1,
              seq_lens: torch.Tensor | None = None, sink_tokens: int = 0, local_tokens: int = 0,
              rows_per_seq: int = 1) -> torch.Tensor:
    """Indices of the `k` largest finite entries of each row of `scores` (R, N) float32, ascending,
    -1 padded -> (R, k) int32.

    block_map: (R, N // map_block_size) int32: index i is written as
        `block_map[r, i // map_block_size] * map_block_size + i % map_block_size` (a position);
        map_block_size must be a power of two (a selection block size).
    sink_tokens / local_tokens (with seq_lens (R // rows_per_seq,) int32): the output is
        (R, sink + local + k), led by the sink and local-window slots of the reference's
        `attended_positions` (the chosen entries must already be candidates, as scores guarantee).
    Rows longer than TOPK_MAX_ROW go through torch.topk (still fixed-size and sync-free).
    """
    require_triton_device("topk_rows", scores)
    if scores.dtype != torch.float32 or scores.dim() != 2 or not scores.is_contiguous():
        raise ValueError(f"topk_rows: scores must be a contiguous 2-D float32 tensor; got {scores.dtype}, "
                         f"shape {tuple(scores.shape)}")
    R, N = scores.shape
    if k < 1:
        raise ValueError(f"topk_rows: k must be >= 1; got {k}")
    width = sink_tokens + local_tokens + k
    if out is None:
        out = torch.empty(R, width, dtype=torch.int32, device=scores.device)
    if out.shape != (R, width) or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"topk_rows: out must be contiguous int32 ({R}, {width}); got {out.dtype} {tuple(out.shape)}")
    if block_map is not None:
        if block_map.dtype != torch.int32 or not block_map.is_contiguous() or block_map.numel() * map_block_size != R * N:
            raise ValueError("topk_rows: block_map must be contiguous int32 of shape (R, N // map_block_size)")
        if map_block_size < 1 or map_block_size & (map_block_size - 1):
            raise ValueError(f"topk_rows: map_block_size must be a power of two (a selection block size); "
                             f"got {map_block_size}")
    if sink_tokens + local_tokens > 0 and (seq_lens is None or seq_lens.dtype != torch.int32
                                           or seq_lens.numel() * rows_per_seq != R):
        raise ValueError("topk_rows: sink/local slots need seq_lens (R // rows_per_seq,) int32")
    if N > TOPK_MAX_ROW:
        return _topk_rows_torch(scores, k, out, block_map, map_block_size, seq_lens, sink_tokens, local_tokens,
                                rows_per_seq)
    block_n = max(triton.next_power_of_2(N), triton.next_power_of_2(k), 32)
    _topk_rows_kernel[(R,)](
        scores, out, block_map if block_map is not None else out,
        seq_lens if seq_lens is not None else out, N,
        K=k, BLOCK_N=block_n, MAP_BLOCKS=block_map is not None, SBS=map_block_size,
        SINK=sink_tokens, LOCAL=local_tokens, HKV=rows_per_seq,
        BLOCK_P=max(16, triton.next_power_of_2(max(sink_tokens, local_tokens, 1))),
        INTERP_PASSES=TOPK_INTERP_PASSES, **pdl_launch(scores),
        num_warps=TOPK_WARPS_SMALL if block_n <= 2048 else TOPK_WARPS_LARGE,
    )
    return out


def _topk_rows_torch(scores, k, out, block_map, map_block_size, seq_lens, sink_tokens, local_tokens, rows_per_seq):
    # Long rows (exact top-k over a whole 128K context): torch.topk, then ascending with pads last.
    R, N = scores.shape
    kk = min(k, N)
    top, where = scores.topk(kk, dim=-1)
    if block_map is not None:
        where = block_map.long().gather(1, where // map_block_size) * map_block_size + where % map_block_size
    big = torch.iinfo(torch.int64).max
    chosen = torch.where(top > float("-inf"), where, big).sort(dim=-1).values
    chosen = torch.where(chosen == big, -1, chosen).to(torch.int32)
    off = sink_tokens + local_tokens
    out[:, off:off + kk] = chosen
    out[:, off + kk:] = -1
    if off:
        L = seq_lens.long().repeat_interleave(rows_per_seq).view(R, 1)
        sinks = torch.arange(sink_tokens, device=scores.device).view(1, -1)
        out[:, :sink_tokens] = torch.where(sinks < L, sinks, -1)
        local = L - local_tokens + torch.arange(local_tokens, device=scores.device).view(1, -1)
        out[:, sink_tokens:off] = torch.where(local >= sink_tokens, local, -1)
    return out


def check_index_query(op: str, name: str, index_query: torch.Tensor, batch: int, num_kv_heads: int, channels: int,
                      group: int, bits: int, heads: int | None = None) -> None:
    """ValueError unless `index_query` can hold the word path's index query: contiguous float32
    (batch, num_kv_heads, channels, H), H a power of two >= group (exactly `heads` when given), index_bits 4 or 8."""
    h = index_query.shape[-1] if index_query.dim() == 4 else 0
    if (bits not in (4, 8) or index_query.dtype != torch.float32 or not index_query.is_contiguous()
            or index_query.shape != (batch, num_kv_heads, channels, h) or h < group or h & (h - 1)
            or (heads is not None and h != heads)):
        want = heads if heads is not None else f"H, a power of two >= {group}"
        raise ValueError(f"{op}: {name} must be contiguous float32 ({batch}, {num_kv_heads}, {channels}, {want}) "
                         f"with index_bits 4 or 8; got {index_query.dtype} {tuple(index_query.shape)}, "
                         f"index_bits={bits}")


def block_score_plan(group: int, head_dim: int, query_bytes: int = 2) -> dict:
    """Launch shape of the block scorer for `group` q heads per kv head over keys of `head_dim` channels
    (a function of shapes only, so CUDA-graph stable). `query_bytes`: the query's element size."""
    block_h = max(16, triton.next_power_of_2(group))
    if block_h > 32:
        return dict(BLOCK_H=block_h, BLOCK_J=32, BLOCK_DK=min(64, triton.next_power_of_2(head_dim)),
                    num_warps=8, num_stages=BLOCK_SCORE_STAGES)
    block_dk = min(BLOCK_SCORE_DK, triton.next_power_of_2(head_dim))
    if head_dim >= BLOCK_SCORE_WIDE_MIN_DK and query_bytes <= 2:
        return dict(BLOCK_H=block_h, BLOCK_J=BLOCK_SCORE_WIDE_TILE, BLOCK_DK=block_dk,
                    num_warps=BLOCK_SCORE_WARPS, num_stages=BLOCK_SCORE_WIDE_STAGES)
    return dict(BLOCK_H=block_h, BLOCK_J=BLOCK_SCORE_TILE, BLOCK_DK=block_dk,
                num_warps=BLOCK_SCORE_WARPS, num_stages=BLOCK_SCORE_STAGES)


def block_scores_triton(query, index, block_table, seq_lens, config, num_selection_blocks: int,
                        out: torch.Tensor | None = None, softmax_scale: float | None = None,
                        index_query: torch.Tensor | None = None, query_in_index_basis: bool = False) -> torch.Tensor:
    """Group bound of every selection block (blended with the midpoint's score by
    `config.block_bound_weight`) -> (B, Hkv, num_selection_blocks) float32, -inf where a
    block is not a candidate. `num_selection_blocks` >= cdiv(max seq len, selection_block_size).
    softmax_scale: the "lse" temperature (default 1 / sqrt(Dk)), as in the reference's `score_blocks`.
    query_in_index_basis: `query` is already in the index's coordinates (`rotate_query`); otherwise it
    is rotated here when the index has a basis (`index_basis="pca"`).
    index_query: optional float32 (B, Hkv, index_channels, H) buffer the same launch fills with
    `token_select.build_index_query(query, index.channel_ids, config.index_bits, H)` (the token stage's input).
    The index's summaries: `block_min` / `block_max` int8 (num_cache_blocks, per_block, Hkv, Dk) with
    equal strides, `block_scale` float32 (num_cache_blocks, per_block, Hkv), any strides."""
    require_triton_device("block_scores", query, index.block_min)
    bmin, bmax, bscale = index.block_min, index.block_max, index.block_scale
    if bmin.shape != bmax.shape or bmin.stride() != bmax.stride() or bmin.dim() != 4:
        raise ValueError(f"block_scores: block_min/block_max must be 4-D with equal shape and strides; got "
                         f"{tuple(bmin.shape)} / {tuple(bmax.shape)}")
    if bmin.dtype != torch.int8 or bmax.dtype != torch.int8:
        raise ValueError(f"block_scores: block_min/block_max must be int8 codes; got {bmin.dtype}/{bmax.dtype} "
                         f"(allocate the index with allocate_index)")
    if bscale.dtype != torch.float32 or bscale.shape != bmin.shape[:3]:
        raise ValueError(f"block_scores: block_scale must be float32 of shape {tuple(bmin.shape[:3])}; got "
                         f"{bscale.dtype} {tuple(bscale.shape)}")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"block_scores: query must be float32, bf16 or fp16; got {query.dtype}")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32 or block_table.stride(1) != 1:
        raise ValueError("block_scores: block_table (row-contiguous) and seq_lens must be int32")
    B, Hq, Dk = query.shape
    Hkv = bmin.shape[2]
    if Hq % Hkv or bmin.shape[3] != Dk:
        raise ValueError(f"block_scores: query {tuple(query.shape)} does not match summaries {tuple(bmin.shape)}")
    if index.basis is not None and not query_in_index_basis:
        query = rotate_query_triton(query, index)
    sbs = config.selection_block_size
    cbs = bmin.shape[1] * sbs
    group = Hq // Hkv
    temperature = group_temperature(softmax_scale, Dk)
    if out is None:
        out = torch.empty(B, Hkv, num_selection_blocks, dtype=torch.float32, device=query.device)
    plan = block_score_plan(group, Dk, query.element_size())
    iq_c = iq_h = 1
    if index_query is not None:
        C = index.channel_ids.shape[1]
        iq_h = index_query.shape[-1]
        check_index_query("block_scores", "index_query", index_query, B, Hkv, C, group, config.index_bits)
        iq_c = C
    grid = (B * Hkv, triton.cdiv(num_selection_blocks, plan["BLOCK_J"]))
    _block_score_kernel[grid](
        query, bmin, bmax, bscale, block_table, seq_lens, out,
        index.channel_ids.contiguous() if index_query is not None else out,
        index_query if index_query is not None else out,
        num_selection_blocks, config.sink_tokens, config.local_tokens, temperature, float(config.block_bound_weight),
        query.stride(0), query.stride(1), query.stride(2),
        bmin.stride(0), bmin.stride(1), bmin.stride(2), bmin.stride(3),
        bscale.stride(0), bscale.stride(1), bscale.stride(2),
        block_table.stride(0),
        HKV=Hkv, GROUP=group, DK=Dk, SBS=sbs, CBS=cbs,
        BLOCK_H=plan["BLOCK_H"], BLOCK_J=plan["BLOCK_J"], BLOCK_DK=plan["BLOCK_DK"],
        IEEE=float32_dots(query.dtype), LSE=config.group_score == "lse", EVEN_DK=Dk % plan["BLOCK_DK"] == 0,
        MID=config.block_bound_weight != 1.0,
        IQ=index_query is not None, IQ_C=iq_c, IQ_H=iq_h, IQ_BITS=config.index_bits if index_query is not None else 4,
        IQ_BLOCK_C=triton.next_power_of_2(iq_c),
        **pdl_launch(query),
        **({"maxnreg": BLOCK_SCORE_MAXNREG} if BLOCK_SCORE_MAXNREG else {}),
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    return out


def select_blocks_triton(query, index, block_table, seq_lens, config,
                         scores: torch.Tensor | None = None, out: torch.Tensor | None = None,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """Top `config.num_blocks` selection blocks per (sequence, kv head) -> (B, Hkv, num_blocks) int32
    logical selection-block ids, ascending, -1 padded. Same set as the reference's `select_blocks`."""
    B = query.shape[0]
    Hkv = index.block_min.shape[2]
    sbs = config.selection_block_size
    cbs = index.block_min.shape[1] * sbs
    n_sel = block_table.shape[1] * cbs // sbs  # every block the table can address: shape-only
    scores = block_scores_triton(query, index, block_table, seq_lens, config, n_sel, out=scores,
                                 softmax_scale=softmax_scale)
    ids = topk_rows(scores.view(B * Hkv, n_sel), config.num_blocks,
                    out=None if out is None else out.view(B * Hkv, config.num_blocks))
    return ids.view(B, Hkv, config.num_blocks)
