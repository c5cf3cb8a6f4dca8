"""Stage 2 of AsyncTLS on the GPU: token scores from the low-bit index inside the kept blocks, top-k.

Design
- `_token_score_kernel`: one program per (sequence, kv head, tile of BLOCK_T candidates). Candidate c
  of a row is token `c % S` of kept block `block_ids[c // S]`, the same layout as the reference's
  `score_tokens`. The program gathers the tile's index codes (C * bits / 8 bytes per token, through
  the block table) and scales, and scores them on one of two paths:
  - word path (`_word_scores`, GQA-sized groups, see `word_score_heads`): `WORD_SCORE_SUB` candidates
    per thread; codes read as 32-bit words and decoded in place, scalar float32 FMAs against the index
    query (`build_index_query`: the group's q heads on the index channels, written by the block scorer
    in the decode step), so nothing is padded to a tensor-core tile and nothing crosses threads;
  - dot path (`_dot_scores`, MLA's large groups, 16 bits, odd code widths): the integers
    `code - (qmax + 1)` (exact in bf16) times the group's q heads in one `tl.dot` (even and odd
    nibbles as two dots for 4 bits); with `index_bits == 16` the full keys (exact `q . k`).
  Then times the token scale; the group score combines the heads by `config.group_score` ("lse" or "max").
- Reads per candidate: C * bits / 8 bytes of codes + 4 bytes of scale (20 bytes at 32 channels, 4 bits),
  versus 2 * Dk bytes for the key.
- `topk_rows` (block_select.py) then keeps `token_budget` candidates, mapping candidate indices to
  positions through `block_ids` in the same launch: ascending positions, -1 padded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_select import _combine_heads, _write_index_query, check_index_query, topk_rows
from .index_basis import rotate_query_triton
from .sparse_decode_reference import group_temperature
from .sparse_attention import _gathered_qk, _pdl_trigger, _pdl_wait, float32_dots, inline_asm_enabled, pdl_launch, require_triton_device

# Launch tunables (measured on the H100, see benchmarks/bench_sparse_decode.py --sweep).
TOKEN_SCORE_TILE = 128  # candidates per program (group of <= 16 q heads)
TOKEN_SCORE_WARPS = 4
# Groups of 17-32 q heads (the dot's 32 rows; GLM's 20 heads on MLA's latent): 256 candidates, 8 warps. H200,
# MLA step at 20 heads, B=16, 32K (`benchmarks/RESULTS.md`, 2026-11-27): 94.3-95.6 us at 128 x 4 -> 90.3;
# at 16 heads the same setting gained 0.7 us (87.7 -> 87.0), so those keep 128 x 4.
TOKEN_SCORE_TILE_32 = 256
TOKEN_SCORE_WARPS_32 = 8
WORD_SCORE_WARPS = 4  # word path: WORD_SCORE_SUB candidates per thread, 32 * warps * sub per program
WORD_SCORE_SUB = 2
WORD_SCORE_PAIRS = True  # word path: 64-bit code loads (two words) where the layout allows
TOKEN_SCORE_MAXNREG = None  # register cap per thread for the token scorer (None: the compiler's choice)
# The word path (scalar FMAs, whole candidates per thread) serves groups whose query on the index
# channels is at most this many values (padded group x channels: GQA's 4 x 32 = 128); larger ones
# (MLA's 16-128 heads x 128 channels) keep the tensor-core dot.
WORD_SCORE_MAX_QUERY = 256


def build_index_query(query: torch.Tensor, channel_ids: torch.Tensor, bits: int, heads: int) -> torch.Tensor:
    """The word path's query: (B, Hkv, C, heads) float32 with `[b, g, c, h] = query[b, g * G + h,
    channel_ids[g, c]] * 2^(-bits * (c % (16 // bits)))` (G = Hq // Hkv; zero for h >= G). The power of
    two undoes the place value a code keeps when the kernel decodes it in place inside its 32-bit
    word. `block_scores_triton(..., index_query=buf)` writes the same values in its launch."""
    B, Hq, _ = query.shape
    Hkv, C = channel_ids.shape
    group = Hq // Hkv
    q = query.float().view(B, Hkv, group, -1)
    picked = torch.gather(q, 3, channel_ids.view(1, Hkv, 1, C).expand(B, Hkv, group, C))  # (B, Hkv, G, C)
    step = 2.0 ** (bits * (torch.arange(C, device=query.device) % (16 // bits)))
    out = torch.zeros(B, Hkv, C, heads, dtype=torch.float32, device=query.device)
    out[..., :group] = (picked / step).transpose(2, 3)
    return out


@triton.jit
def _index_query_kernel(q_ptr, ch_ptr, iq_ptr, stride_qb, stride_qh, stride_qd, HKV: tl.constexpr,
                        GROUP: tl.constexpr, IQ_C: tl.constexpr, IQ_H: tl.constexpr, IQ_BITS: tl.constexpr,
                        IQ_BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        _pdl_wait(1)  # a handful of tiny programs: the token scorer may launch (and start its gathers) at once
    row = tl.program_id(0)
    b = row // HKV
    g = row % HKV
    _write_index_query(q_ptr + b * stride_qb + g * GROUP * stride_qh, ch_ptr + g * IQ_C, iq_ptr + row * IQ_C * IQ_H,
                       stride_qh, stride_qd, GROUP, IQ_C, IQ_H, IQ_BITS, IQ_BLOCK_C)


def index_query_triton(query: torch.Tensor, channel_ids: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """`build_index_query(query, channel_ids, bits, out.shape[-1])` written into `out` by one small launch
    (one program per sequence and kv head). The decode step uses it when the block scorer, which
    otherwise writes these values in its own launch, runs on another stream (lagged selection)."""
    require_triton_device("index_query", query, out)
    B, Hq, _ = query.shape
    Hkv, C = channel_ids.shape
    if Hq % Hkv:
        raise ValueError(f"index_query: {Hq} q heads are not a multiple of {Hkv} kv heads")
    check_index_query("index_query", "out", out, B, Hkv, C, Hq // Hkv, bits)
    heads = out.shape[-1]
    _index_query_kernel[(B * Hkv,)](
        query, channel_ids.contiguous(), out, query.stride(0), query.stride(1), query.stride(2),
        HKV=Hkv, GROUP=Hq // Hkv, IQ_C=C, IQ_H=heads, IQ_BITS=bits, IQ_BLOCK_C=triton.next_power_of_2(C),
        **pdl_launch(query), num_warps=1,
    )
    return out


def word_score_heads(config, group: int) -> int | None:
    """Heads (a power of two >= `group`) of the word path's index query for `config`, or None when
    the token scores take the dot path (16 bits, codes not a whole number of 32-bit words per token,
    or a group too large)."""
    heads = triton.next_power_of_2(group)
    C, bits = config.index_channels, config.index_bits
    if bits == 16 or (C * bits) % 32 or heads * C > WORD_SCORE_MAX_QUERY:
        return None
    return heads


@triton.jit
def _mask_or(w, FIELD: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    # (w & FIELD) | MAGIC; one lop3 with ASM (ptxas emits two when both operands are immediates).
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [w, tl.full(w.shape, FIELD, tl.int32), tl.full(w.shape, MAGIC, tl.int32)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (w & FIELD) | MAGIC


@triton.jit
def _word_scores(iq_ptr, h_mask, codes_ptr, scales_ptr, g, phys, row, cand, TEMP,
                 stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                 C: tl.constexpr, BITS: tl.constexpr, BLOCK_H: tl.constexpr, LSE: tl.constexpr, ASM: tl.constexpr,
                 PAIRS: tl.constexpr):
    # Group score of each candidate (SUB, T), SUB candidates per thread: its codes are read as 32-bit
    # words (strides in words) and every product is a scalar float32 FMA, so nothing is padded to a
    # tensor-core tile and no value crosses threads. Value k of a half word (PER values of BITS bits)
    # is isolated in place by a mask and made a float by OR-ing in the exponent of 2^23:
    # (2^23 + n 2^(BITS k)) - (2^23 + (QMAX + 1) 2^(BITS k)) = (n - QMAX - 1) 2^(BITS k), exact. The
    # 2^(-BITS k) is in the index query (`build_index_query`: channel c of head h scaled by 2^(-BITS (c % PER))).
    # Value k of the low / high half of word j is channel j * VPW + k / j * VPW + PER + k.
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    VPW: tl.constexpr = 32 // BITS
    PER: tl.constexpr = VPW // 2
    NW: tl.constexpr = C * BITS // 32
    offs_h = tl.arange(0, BLOCK_H)
    word_row = codes_ptr.to(tl.pointer_type(tl.int32)) + phys * stride_cb + row * stride_ct + g * stride_ch
    for j in tl.static_range(NW):
        if PAIRS:
            if j % 2 == 0:
                pair = tl.load((word_row + j).to(tl.pointer_type(tl.int64)), mask=cand, other=0)  # (SUB, T)
                w = pair.to(tl.int32)  # the low word (little-endian)
            else:
                w = (pair >> 32).to(tl.int32)
        else:
            w = tl.load(word_row + j, mask=cand, other=0)  # (SUB, T)
        for half in tl.static_range(2):
            if half == 1:
                w = w >> 16
            for k in tl.static_range(PER):
                v = _mask_or(w, ((1 << BITS) - 1) << (BITS * k), 0x4B000000, ASM).to(tl.float32, bitcast=True)
                v = v - (8388608.0 + (QMAX + 1) * (1 << (BITS * k)))
                qv = tl.load(iq_ptr + (j * VPW + half * PER + k) * BLOCK_H + offs_h)  # (H,)
                if j + half + k == 0:
                    s = qv[:, None, None] * v[None, :, :]  # (H, SUB, T), in v's layout (no conversion)
                else:
                    s += qv[:, None, None] * v[None, :, :]
    scale = tl.load(scales_ptr + phys * stride_sb + row * stride_st + g * stride_sh, mask=cand, other=0.0)
    if LSE:  # in base 2: the temperature and log2(e) ride on the scale (one multiply per head)
        s = tl.where(h_mask[:, None, None], s * (scale * (TEMP * 1.4426950408889634))[None, :, :], float("-inf"))
        top = tl.max(s, axis=0)
        top = (top + tl.math.log2(tl.sum(tl.math.exp2(s - top[None, :, :]), axis=0))) * (0.6931471805599453 / TEMP)
    else:
        top = tl.max(tl.where(h_mask[:, None, None], s * scale[None, :, :], float("-inf")), axis=0)
    return tl.where(cand, top, float("-inf"))


@triton.jit
def _dot_scores(q_base, h_mask, codes_ptr, scales_ptr, k_ptr, ch_ptr, g, phys, row, cand, TEMP,
                stride_qd, stride_cb, stride_ct, stride_ch, stride_cc, stride_sb, stride_st, stride_sh,
                stride_kb, stride_kt, stride_kh, stride_kd,
                DK: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, IEEE: tl.constexpr,
                LSE: tl.constexpr):
    # Group score of each candidate (BLOCK_T,) through tensor-core dots of the group's q heads (padded
    # to BLOCK_H >= 16 rows) with the decoded codes (even and odd nibbles as two dots for 4 bits), or
    # with the full keys (BITS 16).
    if BITS == 16:
        k_row = k_ptr + phys * stride_kb + row * stride_kt + g * stride_kh
        s = _gathered_qk(q_base, h_mask, k_row, cand, stride_qd, stride_kd, DK, BLOCK_H, BLOCK_T, BLOCK_DK, IEEE)
    else:
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        offs_i = tl.arange(0, BLOCK_C)
        code_row = codes_ptr + phys * stride_cb + row * stride_ct + g * stride_ch  # (BLOCK_T,)
        scale = tl.load(scales_ptr + phys * stride_sb + row * stride_st + g * stride_sh, mask=cand, other=0.0)
        if BITS == 4:
            i_mask = offs_i < C // 2
            byte = tl.load(code_row[:, None] + offs_i[None, :] * stride_cc, mask=cand[:, None] & i_mask[None, :],
                           other=0).to(tl.int32)
            lo = ((byte & 15) - (QMAX + 1)).to(tl.float32)
            hi = ((byte >> 4) - (QMAX + 1)).to(tl.float32)
            lo = tl.where(i_mask[None, :], lo, 0.0)
            hi = tl.where(i_mask[None, :], hi, 0.0)
            ch_e = tl.load(ch_ptr + g * C + 2 * offs_i, mask=i_mask, other=0)
            ch_o = tl.load(ch_ptr + g * C + 2 * offs_i + 1, mask=i_mask, other=0)
            qm = h_mask[:, None] & i_mask[None, :]
            q_e = tl.load(q_base + ch_e[None, :] * stride_qd, mask=qm, other=0.0)
            q_o = tl.load(q_base + ch_o[None, :] * stride_qd, mask=qm, other=0.0)
            if IEEE:
                s = tl.dot(q_e.to(tl.float32), tl.trans(lo), input_precision="ieee")
                s += tl.dot(q_o.to(tl.float32), tl.trans(hi), input_precision="ieee")
            else:
                s = tl.dot(q_e, tl.trans(lo.to(q_e.dtype)))
                s += tl.dot(q_o, tl.trans(hi.to(q_o.dtype)))
        else:
            i_mask = offs_i < C
            byte = tl.load(code_row[:, None] + offs_i[None, :] * stride_cc, mask=cand[:, None] & i_mask[None, :],
                           other=0).to(tl.int32)
            val = tl.where(i_mask[None, :], (byte - (QMAX + 1)).to(tl.float32), 0.0)
            ch = tl.load(ch_ptr + g * C + offs_i, mask=i_mask, other=0)
            q = tl.load(q_base + ch[None, :] * stride_qd, mask=h_mask[:, None] & i_mask[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(val), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(val.to(q.dtype)))
        s = s * scale[None, :]
    s = tl.where(h_mask[:, None], s, float("-inf"))
    score = tl.where(cand, _combine_heads(s, TEMP, LSE), float("-inf"))
    return score


@triton.jit
def _token_score_kernel(
    q_ptr,  # query dtype, (B, Hq, DK), any strides
    codes_ptr,  # uint8, (num_cache_blocks, CBS, Hkv, NBYTES), any strides (BITS 4/8)
    scales_ptr,  # float32, (num_cache_blocks, CBS, Hkv), any strides (BITS 4/8)
    k_ptr,  # cache dtype, (num_cache_blocks, CBS, Hkv, DK), any strides (BITS 16)
    ch_ptr,  # int64, (Hkv, C) contiguous: index channels
    bt_ptr,  # int32, (B, max_blocks_per_seq)
    seq_lens_ptr,  # int32, (B,)
    block_ids_ptr,  # int32, (B, Hkv, NB) contiguous: kept selection blocks, -1 padded
    scores_ptr,  # float32, (B, Hkv, NB * SBS) contiguous: out, -inf = not a candidate
    iq_ptr,  # float32, (B, Hkv, C, BLOCK_H) contiguous: the index query (WORDS only, see `build_index_query`)
    NB,  # int: kept blocks per row
    SINK,  # int
    LOCAL,  # int
    TEMP,  # float: the "lse" temperature (softmax scale), > 0; unused with LSE = False
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ct, stride_ch, stride_cc,
    stride_sb, stride_st, stride_sh,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_btb,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    DK: tl.constexpr,
    C: tl.constexpr,
    BITS: tl.constexpr,
    SBS: tl.constexpr,
    CBS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= C // 2 (4 bits) or C (8 bits); >= 16 for tl.dot
    BLOCK_DK: tl.constexpr,  # BITS 16: key chunk
    IEEE: tl.constexpr,
    LSE: tl.constexpr,  # group_score "lse" (else "max")
    PDL: tl.constexpr,  # programmatic dependent launch: wait for the previous kernel first
    WORDS: tl.constexpr,  # the word path (`_word_scores`); code strides are then in 32-bit words
    ASM: tl.constexpr,  # WORDS: PTX inline assembly allowed (not under the interpreter)
    SUB: tl.constexpr,  # WORDS: candidates per thread
    PAIRS: tl.constexpr,  # WORDS: read the words two at a time (64-bit loads; even word count, 8-byte aligned)
    IDS_READY: tl.constexpr,  # block ids written before the previous kernel: gather them before the PDL wait
    WRITE_IQ: tl.constexpr,  # WORDS: each program writes its row's index query into iq_ptr first (same values)
    IQ_BLOCK_C: tl.constexpr,  # WRITE_IQ: next power of two >= C
):
    # candidate c -> position p = block_ids[c // SBS] * SBS + c % SBS (valid if the block is kept,
    # p < L, SINK <= p < L - LOCAL);
    # s[h, c] = scale_p * sum_i q[h, ch[i]] * (stored_i(p) - qmax - 1)   (4/8 bits)
    #         = q[h] . K[p]                                               (16 bits)
    # score[c] = max_{h in group} s[h, c] ("max"), or m + log(sum_h exp(TEMP (s[h, c] - m))) / TEMP ("lse")
    if PDL and not IDS_READY:
        _pdl_wait(PDL)
    pid_bg = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    L = tl.load(seq_lens_ptr + b)

    if WORDS:  # (SUB, BLOCK_T // SUB): SUB consecutive candidates per thread, in registers
        offs_c = pid_t * BLOCK_T + (tl.arange(0, SUB)[:, None] + tl.arange(0, BLOCK_T // SUB)[None, :] * SUB)
    else:
        offs_c = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = offs_c < NB * SBS
    blk = tl.load(block_ids_ptr + pid_bg * NB + offs_c // SBS, mask=in_row, other=-1)
    pos = blk * SBS + offs_c % SBS
    cand = in_row & (blk >= 0) & (pos < L) & (pos >= SINK) & (pos < L - LOCAL)
    pos_c = tl.where(cand, pos, 0)
    phys = tl.load(bt_ptr + b * stride_btb + pos_c // CBS, mask=cand, other=0).to(tl.int64)
    row = pos_c % CBS
    if PDL and IDS_READY:
        # Only the index query (and nothing read above) comes from the kernel before this one.
        _pdl_wait(PDL)
    if WRITE_IQ:
        # Every program of the row writes the row's index query (the same values), then reads it back
        # below: the launch needs no index-query launch before it.
        _write_index_query(q_ptr + b * stride_qb + g * GROUP * stride_qh, ch_ptr + g * C,
                           iq_ptr + pid_bg * (C * BLOCK_H), stride_qh, stride_qd, GROUP, C, BLOCK_H, BITS, IQ_BLOCK_C)
        tl.debug_barrier()

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    q_base = q_ptr + b * stride_qb + (g * GROUP + offs_h)[:, None] * stride_qh

    if WORDS:
        score = _word_scores(iq_ptr + pid_bg * (C * BLOCK_H), h_mask, codes_ptr, scales_ptr, g, phys, row, cand,
                             TEMP, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                             C, BITS, BLOCK_H, LSE, ASM, PAIRS)
    else:
        score = _dot_scores(q_base, h_mask, codes_ptr, scales_ptr, k_ptr, ch_ptr, g, phys, row, cand, TEMP,
                            stride_qd, stride_cb, stride_ct, stride_ch, stride_cc, stride_sb, stride_st, stride_sh,
                            stride_kb, stride_kt, stride_kh, stride_kd,
                            DK, C, BITS, BLOCK_H, BLOCK_T, BLOCK_C, BLOCK_DK, IEEE, LSE)
    _pdl_trigger(PDL)
    tl.store(scores_ptr + pid_bg * (NB * SBS) + offs_c, score, mask=in_row)


def token_scores_triton(query, index, key_cache, block_table, seq_lens, block_ids, config,
                        out: torch.Tensor | None = None, softmax_scale: float | None = None,
                        index_query: torch.Tensor | None = None, block_ids_ready: bool = False,
                        write_index_query: bool = False, query_in_index_basis: bool = False) -> torch.Tensor:
    """Index score of every candidate inside `block_ids` (B, Hkv, NB) -> (B, Hkv, NB * S) float32,
    -inf where the slot is not a candidate; equals the scores of the reference's `score_tokens`
    (softmax_scale: the "lse" temperature, default 1 / sqrt(Dk)). index_query: the word path's
    `build_index_query(...)` when the caller has it already (the decode step has the block scorer write
    it); computed here otherwise. Ignored on the dot path. block_ids_ready: `block_ids` were written
    before the kernel launched just before this one (the lagged step's previous ids), so with
    programmatic dependent launch the kernel gathers them and the block table before it waits.
    write_index_query: on the word path, the kernel itself writes `build_index_query(...)` into
    `index_query` (required) before it reads it, so no launch need write it first (the pipelined step's
    token stage then starts with the scorer).
    query_in_index_basis: `query` is already in the index's coordinates (`rotate_query`); otherwise it
    is rotated here when the index has a basis and the codes are scored (index_bits 4 / 8)."""
    require_triton_device("token_scores", query, key_cache, block_ids)
    bits = config.index_bits
    B, Hq, Dk = query.shape
    Hkv = key_cache.shape[2]
    if Hq % Hkv or key_cache.shape[3] != Dk:
        raise ValueError(f"token_scores: query {tuple(query.shape)} does not match key_cache {tuple(key_cache.shape)}")
    if block_ids.dtype != torch.int32 or not block_ids.is_contiguous() or block_ids.shape[:2] != (B, Hkv):
        raise ValueError(f"token_scores: block_ids must be contiguous int32 (B, Hkv, NB); got {block_ids.dtype} "
                         f"{tuple(block_ids.shape)}")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32 or block_table.stride(1) != 1:
        raise ValueError("token_scores: block_table (row-contiguous) and seq_lens must be int32")
    if bits != 16 and index.basis is not None and not query_in_index_basis:
        query = rotate_query_triton(query, index)
    sbs = config.selection_block_size
    NB = block_ids.shape[2]
    group = Hq // Hkv
    temperature = group_temperature(softmax_scale, Dk)
    # index_bits=16 reads full keys: channel ids unused (and the index may be absent).
    channel_ids = index.channel_ids.contiguous() if bits != 16 else block_ids
    C = channel_ids.shape[1] if bits != 16 else 1
    if out is None:
        out = torch.empty(B, Hkv, NB * sbs, dtype=torch.float32, device=query.device)
    block_h = max(16, triton.next_power_of_2(group))
    if bits == 16:
        codes = scales = key_cache
        cs, ss = (0, 0, 0, 0), (0, 0, 0)
        block_c = 16
    else:
        codes, scales = index.codes, index.scales
        if codes is None or codes.dtype != torch.uint8 or scales.dtype != torch.float32:
            raise ValueError(f"token_scores: index_bits={bits} needs uint8 codes and float32 scales")
        cs, ss = codes.stride(), scales.stride()
        block_c = max(16, triton.next_power_of_2(C // 2 if bits == 4 else C))
    heads = word_score_heads(config, group)
    words = (heads is not None and codes.stride(3) == 1 and all(st % 4 == 0 for st in cs[:3])
             and codes.data_ptr() % 4 == 0)
    pairs = (WORD_SCORE_PAIRS and words and (C * bits // 32) % 2 == 0 and all(st % 8 == 0 for st in cs[:3])
             and codes.data_ptr() % 8 == 0)
    block_t, num_warps = ((TOKEN_SCORE_TILE, TOKEN_SCORE_WARPS) if block_h <= 16 else
                          (TOKEN_SCORE_TILE_32, TOKEN_SCORE_WARPS_32) if block_h <= 32 else (32, 8))
    if write_index_query and index_query is None:
        raise ValueError("token_scores: write_index_query=True needs the index_query buffer to write; got None")
    if words:
        if index_query is None:
            index_query = build_index_query(query, channel_ids, bits, heads)
        else:
            check_index_query("token_scores", "index_query", index_query, B, Hkv, C, group, bits, heads)
        cs = tuple(st // 4 for st in cs[:3]) + (1,)
        block_h, num_warps = heads, WORD_SCORE_WARPS
        block_t = 32 * num_warps * WORD_SCORE_SUB
    else:
        index_query = out
    grid = (B * Hkv, triton.cdiv(NB * sbs, block_t))
    _token_score_kernel[grid](
        query, codes, scales, key_cache, channel_ids, block_table, seq_lens, block_ids, out, index_query,
        NB, config.sink_tokens, config.local_tokens, temperature,
        query.stride(0), query.stride(1), query.stride(2),
        cs[0], cs[1], cs[2], cs[3],
        ss[0], ss[1], ss[2],
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
        block_table.stride(0),
        HKV=Hkv, GROUP=group, DK=Dk, C=C, BITS=bits, SBS=sbs, CBS=key_cache.shape[1],
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_C=block_c,
        BLOCK_DK=min(128 if block_h <= 32 else 64, triton.next_power_of_2(Dk)),
        IEEE=float32_dots(query.dtype) or float32_dots(key_cache.dtype), LSE=config.group_score == "lse",
        WORDS=words, ASM=inline_asm_enabled(query), SUB=WORD_SCORE_SUB, PAIRS=pairs, IDS_READY=block_ids_ready,
        WRITE_IQ=words and write_index_query, IQ_BLOCK_C=triton.next_power_of_2(C),
        **pdl_launch(query),
        **({"maxnreg": TOKEN_SCORE_MAXNREG} if TOKEN_SCORE_MAXNREG else {}),
        num_warps=num_warps,
    )
    return out


def select_tokens_triton(query, index, key_cache, block_table, seq_lens, block_ids, config,
                         scores: torch.Tensor | None = None, out: torch.Tensor | None = None,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """Top `config.token_budget` candidates inside `block_ids` -> (B, Hkv, token_budget) int32
    positions, ascending, -1 padded; the same set as the reference's `select_tokens`."""
    B, Hkv, NB = block_ids.shape
    scores = token_scores_triton(query, index, key_cache, block_table, seq_lens, block_ids, config, out=scores,
                                 softmax_scale=softmax_scale)
    sbs = config.selection_block_size
    pos = topk_rows(scores.view(B * Hkv, NB * sbs), config.token_budget,
                    out=None if out is None else out.view(B * Hkv, config.token_budget),
                    block_map=block_ids.view(B * Hkv, NB), map_block_size=sbs)
    return pos.view(B, Hkv, config.token_budget)
