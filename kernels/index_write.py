"""Index write on the GPU: int8 block min/max summaries and low-bit token codes for new keys, fused.

Same result as the reference's `write_index` (read its docstring for the merge rule), with masks
instead of dropping padded slots, so nothing depends on data-dependent shapes or host syncs.

Design
- `_index_codes_kernel`, one program per new token (all kv heads): gathers the index channels of the
  key, quantises them (scale `max |k_c| / qmax`, round half to even, clamp, offset by `qmax + 1`,
  4 bits packed two per byte) and writes codes and scales at the token's slot. It also claims the
  token's selection block: `claim[group] = min(claim[group], token)` (an int32 atomic), so after this
  launch every touched selection block knows its lowest-indexed new token, its *leader*.
- `_index_summary_kernel`, one program per new token; only leaders work. A leader folds every new
  token of its selection block (a scan over the call's slots, keys loaded only for matching chunks)
  into float32 min / max, (Hkv, D) tiles; replaces the stored summary if any of them starts the block
  (`offset % S == 0`) and merges into it, dequantised, otherwise; requantises it (per kv head: a new
  scale from the max over channels, min rounded down, max up, with the correction step that makes the
  bound exact: exactly the reference's `quantize_summary`), then releases the claim (back to
  INT32_MAX). One writer per summary, so no atomics on summaries and no ordering between programs is
  needed. Every float32 operation is the reference's, one at a time (`div_rn`, no fused multiply-add),
  so the codes and scales agree bit for bit; no libdevice, so the interpreter runs it too.
- The claim buffer (one int32 per selection block of the cache) lives in `IndexWriteWorkspace`;
  between calls it holds INT32_MAX everywhere, an invariant the summary kernel restores.
- The scan stops once a leader has found `S` tokens (a selection block has no more distinct slots),
  so a call in slot order (vLLM's) costs O(S) per full block; only partly filled blocks scan to the
  end of the call (one per sequence at most), and decode calls are a handful of tokens. Keys are
  loaded only between the first and the last match of each scan step: a decode call costs one key
  load per leader: 5.6 us per decode call on an H100, against 312 us when every step of the scan
  loaded keys as 3-D tiles (`benchmarks/RESULTS.md`, 2026-11-26).
- `_index_write_one_pass_kernel` serves calls of at most ONE_PASS_MAX_TOKENS tokens (decode steps): both
  kernels' work in one launch, without the claim buffer. The call's slots fit one tile, so a token leads
  its selection block when no earlier token of the call is in it (the claim's rule, without the atomic and
  the launch boundary). Every load that does not depend on that test (the token's own key, the stored
  summary, the index channels) is issued before it, and no branch depends on it (non-leaders' stores are
  masked), so the chain of dependent loads is the slot, then everything else. Per layer in a decode
  graph on an H200 (RESULTS, 2026-11-27): MLA B=16 13.9 -> 6.0 us, GQA B=8 7.5 -> 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attention import require_triton_device, zero_rows_like
from .index_basis import rotate_keys_triton
from .sparse_decode_reference import SUMMARY_QMAX, SUMMARY_TOL

_INT32_MAX = 2147483647
# Calls of at most this many tokens (decode steps) take `_index_write_one_pass_kernel`, one launch
# without the claim buffer; longer ones (prefill) the claim kernels, whose scan is O(SBS) per block.
ONE_PASS_MAX_TOKENS = 256
# The one-pass kernel's launch: heads per tile at least ONE_PASS_MIN_BLOCK_H (1: MLA's one latent head is not
# padded to two), ONE_PASS_WARPS warps. H200, one new key per sequence, per layer with 8 layers' writes in one
# CUDA graph (`benchmarks/RESULTS.md`, 2026-11-27): MLA B=16 13.9 us (claim kernels) -> 10.0 (one pass, two
# heads per tile) -> 6.0 (one head); GQA B=8 7.5 -> 3.9; 8 warps lose (7.1, 5.1).
ONE_PASS_MIN_BLOCK_H = 1
ONE_PASS_WARPS = 4


@triton.jit
def _round_half_even(x):
    # torch.round semantics (ties to even) without libdevice, so the interpreter runs it too.
    f = tl.floor(x)
    d = x - f
    f_even = (f - 2.0 * tl.floor(f * 0.5)) == 0.0
    up = (d > 0.5) | ((d == 0.5) & (~f_even))
    return tl.where(up, f + 1.0, f)


@triton.jit
def _masked_if(mask, flag):
    # mask & a scalar flag; `!= 0` because Triton's interpreter turns that `&` into int32, which it
    # refuses as a store mask.
    return (mask & flag) != 0


@triton.jit
def _gather_key_channels(key_row, tail_row, ch, mask, stride_kd, stride_td, SPLIT: tl.constexpr,
                         HAS_TAIL: tl.constexpr):
    # Channels `ch` of a key row; with a tail, channels from SPLIT on are read from the tail's row.
    if HAS_TAIL:
        head = tl.load(key_row + ch * stride_kd, mask=mask & (ch < SPLIT), other=0.0)
        tail = tl.load(tail_row + (ch - SPLIT) * stride_td, mask=mask & (ch >= SPLIT), other=0.0)
        return tl.where(ch < SPLIT, head, tail)
    else:
        return tl.load(key_row + ch * stride_kd, mask=mask, other=0.0)


@triton.jit
def _write_token_codes(key_ptr, tail_ptr, i64, ch_ptr, codes_ptr, scales_ptr, block, off, valid,
                       stride_kh, stride_kd, stride_kn, stride_tn, stride_th, stride_td,
                       stride_cb, stride_ct, stride_ch, stride_cc,
                       stride_sb, stride_st, stride_sh,
                       HKV: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_C: tl.constexpr, STORE_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
                       HAS_TAIL: tl.constexpr):
    # scale = max_c |k_c| / qmax; q_c = clamp(rne(k_c / scale), -qmax, qmax) (scale 0 -> divide by 1);
    # stored_c = q_c + qmax + 1; 4 bits: byte i = stored_{2i} | stored_{2i+1} << 4. Stores only if `valid`.
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    h_mask = offs_h < HKV
    key_row = key_ptr + i64 * stride_kn + offs_h[:, None] * stride_kh
    tail_row = tail_ptr + i64 * stride_tn + offs_h[:, None] * stride_th
    code_row = codes_ptr + block * stride_cb + off * stride_ct + offs_h[:, None] * stride_ch
    if BITS == 4:
        m = h_mask[:, None] & (offs_c[None, :] < C // 2)
        ch_e = tl.load(ch_ptr + offs_h[:, None] * C + 2 * offs_c[None, :], mask=m, other=0)
        ch_o = tl.load(ch_ptr + offs_h[:, None] * C + 2 * offs_c[None, :] + 1, mask=m, other=0)
        x_e = _gather_key_channels(key_row, tail_row, ch_e, m, stride_kd, stride_td, SPLIT,
                                   HAS_TAIL).to(STORE_DTYPE).to(tl.float32)
        x_o = _gather_key_channels(key_row, tail_row, ch_o, m, stride_kd, stride_td, SPLIT,
                                   HAS_TAIL).to(STORE_DTYPE).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x_e), axis=1), tl.max(tl.abs(x_o), axis=1))
        scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
        safe = tl.where(scale > 0, scale, 1.0)
        q_e = _round_half_even(tl.math.div_rn(x_e, safe[:, None]))
        q_o = _round_half_even(tl.math.div_rn(x_o, safe[:, None]))
        s_e = (tl.minimum(tl.maximum(q_e, -QMAX), QMAX) + (QMAX + 1)).to(tl.int32)
        s_o = (tl.minimum(tl.maximum(q_o, -QMAX), QMAX) + (QMAX + 1)).to(tl.int32)
        byte = (s_e | (s_o << 4)).to(tl.uint8)
        tl.store(code_row + offs_c[None, :] * stride_cc, byte, mask=_masked_if(m, valid))
    else:
        m = h_mask[:, None] & (offs_c[None, :] < C)
        ch = tl.load(ch_ptr + offs_h[:, None] * C + offs_c[None, :], mask=m, other=0)
        x = _gather_key_channels(key_row, tail_row, ch, m, stride_kd, stride_td, SPLIT,
                                 HAS_TAIL).to(STORE_DTYPE).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
        safe = tl.where(scale > 0, scale, 1.0)
        q = _round_half_even(tl.math.div_rn(x, safe[:, None]))
        stored = (tl.minimum(tl.maximum(q, -QMAX), QMAX) + (QMAX + 1)).to(tl.uint8)
        tl.store(code_row + offs_c[None, :] * stride_cc, stored, mask=_masked_if(m, valid))
    tl.store(scales_ptr + block * stride_sb + off * stride_st + offs_h * stride_sh, scale,
             mask=_masked_if(h_mask, valid))


@triton.jit
def _flat_key_layout(stride_kh, stride_kd, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    # Keys are folded as flat (BLOCK_H * BLOCK_D,) rows, head-major with each head padded to BLOCK_D, so a
    # reshape gives the (BLOCK_H, BLOCK_D) tiles of the requantisation: (offsets in a key row, mask).
    offs_f = tl.arange(0, BLOCK_H * BLOCK_D)
    f_mask = ((offs_f // BLOCK_D) < HKV) & ((offs_f % BLOCK_D) < D)
    f_off = (offs_f // BLOCK_D) * stride_kh + (offs_f % BLOCK_D) * stride_kd
    return f_off, f_mask


@triton.jit
def _flat_tail_layout(stride_th, stride_td, HKV: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # With keys held in two parts, the flat rows' channels from SPLIT on: (offsets in a tail row, mask).
    offs_f = tl.arange(0, BLOCK_H * BLOCK_D)
    d = offs_f % BLOCK_D
    t_mask = ((offs_f // BLOCK_D) < HKV) & (d >= SPLIT) & (d < D)
    t_off = (offs_f // BLOCK_D) * stride_th + (d - SPLIT) * stride_td
    return t_off, t_mask


@triton.jit
def _load_flat_keys(key_ptr, tail_ptr, tok, rows_mask, f_off, f_mask, t_off, t_mask, stride_kn, stride_tn,
                    HAS_TAIL: tl.constexpr):
    # Flat key rows of tokens `tok` (int64): one token (() with the (F,) offsets), or (T, 1) with rows_mask
    # (T, 1) and (1, F) offsets and masks. Channels from the key's row, and with a tail those from SPLIT on
    # (t_mask) from the tail's row.
    if HAS_TAIL:
        head = tl.load(key_ptr + tok * stride_kn + f_off, mask=rows_mask & f_mask & (~t_mask), other=0.0)
        tail = tl.load(tail_ptr + tok * stride_tn + t_off, mask=rows_mask & t_mask, other=0.0)
        return tl.where(t_mask, tail, head)
    else:
        return tl.load(key_ptr + tok * stride_kn + f_off, mask=rows_mask & f_mask, other=0.0)


@triton.jit
def _fold_group_keys(key_ptr, tail_ptr, slot_ptr, j0, lo, hi, N, group, after, f_off, f_mask, t_off, t_mask,
                     flat_min, flat_max, stride_kn, stride_tn, SBS: tl.constexpr, KEY_DTYPE: tl.constexpr,
                     BLOCK_T: tl.constexpr, HAS_TAIL: tl.constexpr):
    # Min / max into the flat rows of the keys of tokens j0 + [lo, hi) (BLOCK_T at a time) whose slot is
    # in selection block `group` and whose index is past `after`.
    for t0 in range((lo // BLOCK_T) * BLOCK_T, hi, BLOCK_T):
        offs_t = j0 + t0 + tl.arange(0, BLOCK_T)
        s_t = tl.load(slot_ptr + offs_t, mask=offs_t < N, other=-1)
        m_t = (s_t >= 0) & (s_t // SBS == group) & (offs_t > after)  # (BLOCK_T,)
        k = _load_flat_keys(key_ptr, tail_ptr, offs_t[:, None].to(tl.int64), m_t[:, None], f_off[None, :],
                            f_mask[None, :], t_off[None, :], t_mask[None, :], stride_kn, stride_tn,
                            HAS_TAIL)  # (BLOCK_T, BLOCK_H * BLOCK_D)
        k = k.to(KEY_DTYPE).to(tl.float32)
        flat_min = tl.minimum(flat_min, tl.min(tl.where(m_t[:, None], k, float("inf")), axis=0))
        flat_max = tl.maximum(flat_max, tl.max(tl.where(m_t[:, None], k, float("-inf")), axis=0))
    return flat_min, flat_max


@triton.jit
def _load_old_summary(group, bmin_ptr, bmax_ptr, bscale_ptr, HKV: tl.constexpr, D: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # The stored summary of selection block `group`, dequantised: (BLOCK_H, BLOCK_D) float32 min, max.
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < HKV
    hd_mask = h_mask[:, None] & (offs_d[None, :] < D)
    row = group * (HKV * D) + offs_h[:, None] * D + offs_d[None, :]
    old_scale = tl.load(bscale_ptr + group * HKV + offs_h, mask=h_mask, other=0.0)
    old_min = tl.load(bmin_ptr + row, mask=hd_mask, other=0).to(tl.float32) * old_scale[:, None]
    old_max = tl.load(bmax_ptr + row, mask=hd_mask, other=0).to(tl.float32) * old_scale[:, None]
    return old_min, old_max


@triton.jit
def _store_summary(flat_min, flat_max, old_min, old_max, reset, group, write, bmin_ptr, bmax_ptr, bscale_ptr,
                   HKV: tl.constexpr, D: tl.constexpr, TOL: tl.constexpr, QMAX: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # For selection block G, over the call's tokens T_G in G (folded into flat_min / flat_max), per kv head:
    #   min_G = min_{t in T_G} k_t                   if `reset` (some t in T_G has offset % SBS == 0),
    #         = min(code_min_G * scale_G, min_t k_t)  otherwise (max alike; old_* hold the stored summary);
    #   amax = max_d max(|min_d|, |max_d|); scale = amax / 127, one float32 step up if 127 * scale < amax;
    #   safe = scale or 1 when 0;
    #   code_min = floor(min / safe + TOL), minus 1 if code_min * scale > min;
    #   code_max = ceil(max / safe - TOL), plus 1 if code_max * scale < max; both clamped to [-127, 127]
    # with ceil(x) = -floor(-x). Each product is compared as it is (no add after it, so no fused
    # multiply-add). Summaries are (G, Hkv, D) rows: contiguous, so no strides. Stores only if `write`.
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < HKV
    hd_mask = h_mask[:, None] & (offs_d[None, :] < D)  # (BLOCK_H, BLOCK_D)
    cur_min = tl.reshape(flat_min, (BLOCK_H, BLOCK_D))
    cur_max = tl.reshape(flat_max, (BLOCK_H, BLOCK_D))
    if reset == 0:
        cur_min = tl.minimum(cur_min, old_min)
        cur_max = tl.maximum(cur_max, old_max)
    amax = tl.max(tl.where(hd_mask, tl.maximum(tl.abs(cur_min), tl.abs(cur_max)), 0.0), axis=1)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))  # (BLOCK_H,)
    # nextafter(scale, inf) for scale >= 0: the next bit pattern up.
    up = (scale.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    scale = tl.where(scale * QMAX < amax, up, scale)
    safe = tl.where(scale > 0, scale, 1.0)[:, None]
    code_min = tl.floor(tl.math.div_rn(cur_min, safe) + TOL)
    code_max = -tl.floor(-(tl.math.div_rn(cur_max, safe) - TOL))
    code_min = tl.where(code_min * scale[:, None] > cur_min, code_min - 1.0, code_min)
    code_max = tl.where(code_max * scale[:, None] < cur_max, code_max + 1.0, code_max)
    code_min = tl.minimum(tl.maximum(code_min, -QMAX), QMAX)
    code_max = tl.minimum(tl.maximum(code_max, -QMAX), QMAX)
    row = group * (HKV * D) + offs_h[:, None] * D + offs_d[None, :]
    tl.store(bmin_ptr + row, code_min.to(tl.int8), mask=_masked_if(hd_mask, write))
    tl.store(bmax_ptr + row, code_max.to(tl.int8), mask=_masked_if(hd_mask, write))
    tl.store(bscale_ptr + group * HKV + offs_h, scale, mask=_masked_if(h_mask, write))


@triton.jit
def _index_codes_kernel(
    key_ptr,  # key dtype, (N, Hkv, D), any strides
    slot_ptr,  # int64, (N,): physical_block * CBS + offset, negative = padding
    ch_ptr,  # int64, (Hkv, C) contiguous: index channels
    codes_ptr,  # uint8, (num_cache_blocks, CBS, Hkv, NBYTES), any strides
    scales_ptr,  # float32, (num_cache_blocks, CBS, Hkv), any strides
    claim_ptr,  # int32, (num_cache_blocks * CBS // SBS,): lowest new token per selection block
    stride_kn, stride_kh, stride_kd,
    stride_cb, stride_ct, stride_ch, stride_cc,
    stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr,
    C: tl.constexpr,  # index channels
    BITS: tl.constexpr,  # 4, 8 or 16 (16: no codes, claim only)
    CBS: tl.constexpr,
    SBS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= C // 2 for 4 bits, >= C for 8 bits
    STORE_DTYPE: tl.constexpr,  # the index's key dtype: the reference casts keys to it before quantising
):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i)
    if slot >= 0:
        tl.atomic_min(claim_ptr + slot // SBS, i)
        if BITS != 16:
            i64 = i.to(tl.int64)  # key offsets pass 2^31 elements for millions of tokens
            _write_token_codes(key_ptr, key_ptr, i64, ch_ptr, codes_ptr, scales_ptr, slot // CBS, slot % CBS,
                               slot >= 0, stride_kh, stride_kd, stride_kn, 0, 0, 0, stride_cb, stride_ct, stride_ch,
                               stride_cc, stride_sb, stride_st, stride_sh, HKV, C, BITS, BLOCK_H, BLOCK_C,
                               STORE_DTYPE, SPLIT=0, HAS_TAIL=False)


@triton.jit
def _index_summary_kernel(
    key_ptr,  # key dtype, (N, Hkv, D), any strides
    slot_ptr,  # int64, (N,)
    bmin_ptr,  # int8, (num_cache_blocks, CBS // SBS, Hkv, D) contiguous: codes of the min
    bmax_ptr,  # int8, same shape, contiguous: codes of the max
    bscale_ptr,  # float32, (num_cache_blocks, CBS // SBS, Hkv) contiguous
    claim_ptr,  # int32, (num_cache_blocks * CBS // SBS,)
    N,  # int: new tokens in this call
    stride_kn, stride_kh, stride_kd,
    HKV: tl.constexpr,
    D: tl.constexpr,
    SBS: tl.constexpr,
    KEY_DTYPE: tl.constexpr,  # the index's key dtype: keys are cast to it, then to float32
    TOL: tl.constexpr,  # the reference's SUMMARY_TOL, in code steps
    QMAX: tl.constexpr,  # the reference's SUMMARY_QMAX: codes in [-QMAX, QMAX]
    BLOCK_H: tl.constexpr,  # >= HKV
    BLOCK_D: tl.constexpr,  # >= D
    BLOCK_SCAN: tl.constexpr,  # slots tested per scan step
    BLOCK_T: tl.constexpr,  # keys loaded per inner step
):
    # The leader of each selection block (the claim) folds the block's new keys; `_store_summary` has the rule.
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i)
    if slot >= 0:
        group = slot // SBS
        if tl.load(claim_ptr + group) == i:
            f_off, f_mask = _flat_key_layout(stride_kh, stride_kd, HKV, D, BLOCK_H, BLOCK_D)
            flat_min = tl.full((BLOCK_H * BLOCK_D,), float("inf"), tl.float32)
            flat_max = tl.full((BLOCK_H * BLOCK_D,), float("-inf"), tl.float32)
            reset = 0
            found = 0
            j0 = i  # tokens before the leader are in other groups
            # A selection block holds at most SBS distinct slots: stop once all are found, so a call
            # whose tokens sit in slot order (vLLM's) scans O(SBS) per full block.
            while (j0 < N) & (found < SBS):
                offs_j = j0 + tl.arange(0, BLOCK_SCAN)
                s_j = tl.load(slot_ptr + offs_j, mask=offs_j < N, other=-1)
                match = (s_j >= 0) & (s_j // SBS == group)
                n_match = tl.sum(match.to(tl.int32), axis=0)
                found += n_match
                if n_match > 0:
                    reset = tl.maximum(reset, tl.max((match & (s_j % SBS == 0)).to(tl.int32), axis=0))
                    # Keys are loaded only between the first and last match of this scan step (one
                    # BLOCK_T step for a decode token, SBS / BLOCK_T for a block written in order).
                    pos = tl.arange(0, BLOCK_SCAN)
                    lo = tl.min(tl.where(match, pos, BLOCK_SCAN), axis=0)
                    hi = tl.max(tl.where(match, pos, -1), axis=0) + 1
                    flat_min, flat_max = _fold_group_keys(key_ptr, key_ptr, slot_ptr, j0, lo, hi, N, group, i - 1,
                                                          f_off, f_mask, f_off, f_mask, flat_min, flat_max,
                                                          stride_kn, 0, SBS, KEY_DTYPE, BLOCK_T, HAS_TAIL=False)
                j0 += BLOCK_SCAN
            # Loaded after the scan, not before it: held through a long prefill scan it cost 4-10% (RESULTS).
            old_min, old_max = _load_old_summary(group, bmin_ptr, bmax_ptr, bscale_ptr, HKV, D, BLOCK_H, BLOCK_D)
            _store_summary(flat_min, flat_max, old_min, old_max, reset, group, slot >= 0, bmin_ptr, bmax_ptr,
                           bscale_ptr, HKV, D, TOL, QMAX, BLOCK_H, BLOCK_D)
            tl.store(claim_ptr + group, 2147483647)


@triton.jit
def _index_write_one_pass_kernel(
    key_ptr,  # key dtype, (N, Hkv, SPLIT): the keys' first SPLIT channels, any strides
    tail_ptr,  # key dtype, (N, Hkv, D - SPLIT): their other channels, when HAS_TAIL (MLA's k_pe)
    slot_ptr, ch_ptr, codes_ptr, scales_ptr, bmin_ptr, bmax_ptr, bscale_ptr,
    N,  # int: new tokens in this call, at most BLOCK_N
    stride_kn, stride_kh, stride_kd,
    stride_tn, stride_th, stride_td,
    stride_cb, stride_ct, stride_ch, stride_cc,
    stride_sb, stride_st, stride_sh,
    HKV: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, CBS: tl.constexpr,
    SBS: tl.constexpr, KEY_DTYPE: tl.constexpr, TOL: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= N: the whole call's slots in one tile
    BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr,  # D without a tail
    HAS_TAIL: tl.constexpr,
):
    # Both kernels above in one launch for calls of at most BLOCK_N tokens (decode steps): a token leads
    # its selection block if no earlier token of the call is in it (the claim's rule, read from the call's
    # slots instead of an atomic). No branch on the leader test (non-leaders' stores are masked), and every
    # load that does not depend on it (the token's own key, the stored summary) is issued before it, so they
    # overlap. Padded slots read selection block 0 (a negative one would address before the buffers).
    i = tl.program_id(0)
    i64 = i.to(tl.int64)
    slot = tl.load(slot_ptr + i)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0)
    group = slot // SBS
    if BITS != 16:
        _write_token_codes(key_ptr, tail_ptr, i64, ch_ptr, codes_ptr, scales_ptr, slot // CBS, slot % CBS, valid,
                           stride_kh, stride_kd, stride_kn, stride_tn, stride_th, stride_td, stride_cb, stride_ct,
                           stride_ch, stride_cc, stride_sb, stride_st, stride_sh, HKV, C, BITS, BLOCK_H, BLOCK_C,
                           KEY_DTYPE, SPLIT, HAS_TAIL)
    f_off, f_mask = _flat_key_layout(stride_kh, stride_kd, HKV, D, BLOCK_H, BLOCK_D)
    t_off, t_mask = _flat_tail_layout(stride_th, stride_td, HKV, D, SPLIT, BLOCK_H, BLOCK_D)
    own = _load_flat_keys(key_ptr, tail_ptr, i64, True, f_off, f_mask, t_off, t_mask, stride_kn, stride_tn,
                          HAS_TAIL).to(KEY_DTYPE).to(tl.float32)
    old_min, old_max = _load_old_summary(group, bmin_ptr, bmax_ptr, bscale_ptr, HKV, D, BLOCK_H, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    s_n = tl.load(slot_ptr + offs_n, mask=offs_n < N, other=-1)
    same = (s_n >= 0) & (s_n // SBS == group)
    leader = valid & (tl.sum((same & (offs_n < i)).to(tl.int32), axis=0) == 0)
    later = same & (offs_n > i) & leader
    reset = tl.max(((same & (offs_n >= i)) & (s_n % SBS == 0)).to(tl.int32), axis=0)
    lo = tl.min(tl.where(later, offs_n, BLOCK_N), axis=0)
    hi = tl.max(tl.where(later, offs_n, -1), axis=0) + 1
    flat_min, flat_max = _fold_group_keys(key_ptr, tail_ptr, slot_ptr, 0, lo, hi, N, group, i, f_off, f_mask, t_off,
                                          t_mask, own, own, stride_kn, stride_tn, SBS, KEY_DTYPE, BLOCK_T, HAS_TAIL)
    _store_summary(flat_min, flat_max, old_min, old_max, reset, group, leader, bmin_ptr, bmax_ptr, bscale_ptr,
                   HKV, D, TOL, QMAX, BLOCK_H, BLOCK_D)


class IndexWriteWorkspace:
    """The claim buffer of `write_index_triton`: one int32 per selection block of the cache, INT32_MAX
    between calls. Allocate once per layer shape (or share across layers: calls are serial)."""

    def __init__(self, num_cache_blocks: int, blocks_per_cache_block: int, device) -> None:
        self.claim = torch.full((num_cache_blocks * blocks_per_cache_block,), _INT32_MAX, dtype=torch.int32,
                                device=device)


_TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def write_index_triton(index, key: torch.Tensor, slot_mapping: torch.Tensor, config,
                       workspace: IndexWriteWorkspace | None = None, key_tail: torch.Tensor | None = None) -> None:
    """Fold new keys (N, Hkv, D) at `slot_mapping` (N,) int64 into `index`, in place; equals the
    reference's `write_index` bit for bit (int8 summary codes, their float32 `block_scale`, token
    codes and scales). Keys are cast to `index.key_dtype` first (and rotated by `index.basis` when set,
    by `index_basis.rotate_triton`: the reference's rotation up to float32 summation order). No host
    synchronisation; padded (negative) slots are skipped. `block_min` / `block_max` must be contiguous int8
    and `block_scale` contiguous float32, as `allocate_index` makes them. `workspace` holds the claim buffer of calls longer
    than ONE_PASS_MAX_TOKENS (allocated here when None; pass one to keep allocations out of a graph).
    `key_tail` (N, Hkv, P), same dtype as `key`: the keys' last P channels when the caller holds them in two
    parts (MLA's `kv_c_normed` and `k_pe`); the key is then `cat([key, key_tail], -1)`, which calls of at most
    ONE_PASS_MAX_TOKENS tokens into an index without a basis read from both parts without making it (the others
    join them first)."""
    require_triton_device("write_index", key, index.block_min, *(() if key_tail is None else (key_tail,)))
    if key_tail is not None:
        if key_tail.dim() != 3 or key.dim() != 3 or key_tail.shape[:2] != key.shape[:2] or key_tail.dtype != key.dtype:
            raise ValueError(f"write_index: key_tail must be (N, Hkv, P) with key's (N, Hkv) and dtype; got key "
                             f"{tuple(key.shape)} {key.dtype}, key_tail {tuple(key_tail.shape)} {key_tail.dtype}")
    bmin, bmax, bscale = index.block_min, index.block_max, index.block_scale
    if bmin.dtype != torch.int8 or bmax.dtype != torch.int8 or bscale.dtype != torch.float32:
        raise ValueError(f"write_index: block_min/block_max must be int8 and block_scale float32; got "
                         f"{bmin.dtype}/{bmax.dtype}/{bscale.dtype} (allocate the index with allocate_index)")
    if bmin.dim() != 4 or bmax.shape != bmin.shape or bscale.shape != bmin.shape[:3]:
        raise ValueError(f"write_index: block_min/block_max must be (num_cache_blocks, per_block, Hkv, D) and "
                         f"block_scale their first three dims; got {tuple(bmin.shape)}, {tuple(bmax.shape)}, "
                         f"{tuple(bscale.shape)}")
    if not (bmin.is_contiguous() and bmax.is_contiguous() and bscale.is_contiguous()):
        raise ValueError("write_index: block_min/block_max/block_scale must be contiguous (allocate_index makes "
                         "them so)")
    split = key.shape[-1] if key.dim() == 3 else -1
    full_shape = (*key.shape[:2], split + key_tail.shape[2]) if key_tail is not None else tuple(key.shape)
    if len(full_shape) != 3 or tuple(full_shape[1:]) != tuple(bmin.shape[2:]):
        got = (f"key {tuple(key.shape)} + key_tail {tuple(key_tail.shape)} = {tuple(full_shape)}"
               if key_tail is not None else str(tuple(full_shape)))
        raise ValueError(f"write_index: key must be (N, Hkv, D) = (N, {bmin.shape[2]}, {bmin.shape[3]})"
                         f"{' with its tail' if key_tail is not None else ''}; got {got}")
    if key_tail is not None and (index.basis is not None or key.shape[0] > ONE_PASS_MAX_TOKENS):
        key, key_tail = torch.cat([key, key_tail], dim=-1), None  # prefill, or a rotated index
    if slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"write_index: slot_mapping must be (N,) int64; got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if index.key_dtype not in _TORCH_TO_TL:
        raise ValueError(f"write_index: index key dtype must be bf16/fp16/fp32; got {index.key_dtype}")
    slot_mapping = slot_mapping.contiguous()
    if index.basis is not None:
        key = rotate_keys_triton(key, index)  # the index's coordinates (index_basis="pca"), one launch
    N = key.shape[0]
    if N == 0:
        return
    num_cache_blocks, per_block, Hkv, D = bmin.shape
    sbs = config.selection_block_size
    cbs = per_block * sbs
    one_pass = N <= ONE_PASS_MAX_TOKENS
    if workspace is None and not one_pass:
        workspace = IndexWriteWorkspace(num_cache_blocks, per_block, key.device)
    bits = config.index_bits
    C = index.channel_ids.shape[1]
    channel_ids = index.channel_ids.contiguous()
    codes, scales = index.codes, index.scales
    if bits != 16:
        if codes is None or scales is None or codes.dtype != torch.uint8 or scales.dtype != torch.float32:
            raise ValueError(f"write_index: index_bits={bits} needs uint8 codes and float32 scales")
        cs, ss = codes.stride(), scales.stride()
    else:
        codes = scales = bscale  # unused pointers
        cs, ss = (0, 0, 0, 0), (0, 0, 0)
    key_dtype = _TORCH_TO_TL[index.key_dtype]
    block_h = max(ONE_PASS_MIN_BLOCK_H if one_pass else 2, triton.next_power_of_2(Hkv))
    block_c = max(2, triton.next_power_of_2(C // 2 if bits == 4 else C))
    block_d = max(16, triton.next_power_of_2(D))
    block_t = max(1, min(256, 8192 // (block_h * block_d)))  # keys loaded per step: 8 x 8 heads x 128
    if one_pass:
        tail = key if key_tail is None else key_tail
        tail_strides = (0, 0, 0) if key_tail is None else key_tail.stride()
        _index_write_one_pass_kernel[(N,)](
            key, tail, slot_mapping, channel_ids, codes, scales, bmin, bmax, bscale, N, *key.stride(),
            *tail_strides, *cs, *ss,
            HKV=Hkv, D=D, C=C, BITS=bits, CBS=cbs, SBS=sbs, KEY_DTYPE=key_dtype, TOL=SUMMARY_TOL,
            QMAX=float(SUMMARY_QMAX), BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_D=block_d,
            BLOCK_N=max(16, triton.next_power_of_2(N)), BLOCK_T=block_t, SPLIT=split if key_tail is not None else D,
            HAS_TAIL=key_tail is not None, num_warps=ONE_PASS_WARPS,
        )
        return
    _index_codes_kernel[(N,)](
        key, slot_mapping, channel_ids, codes, scales, workspace.claim, *key.stride(), *cs, *ss,
        HKV=Hkv, C=C, BITS=bits, CBS=cbs, SBS=sbs, BLOCK_H=block_h, BLOCK_C=block_c, STORE_DTYPE=key_dtype,
        num_warps=1 if Hkv * C <= 256 else 4,
    )
    _index_summary_kernel[(N,)](
        key, slot_mapping, bmin, bmax, bscale, workspace.claim, N, *key.stride(),
        HKV=Hkv, D=D, SBS=sbs, KEY_DTYPE=key_dtype, TOL=SUMMARY_TOL, QMAX=float(SUMMARY_QMAX),
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_SCAN=256, BLOCK_T=block_t, num_warps=4,
    )


def warm_write_index(index, key: torch.Tensor, config, workspace: IndexWriteWorkspace,
                     key_tail: torch.Tensor | None = None) -> None:
    """Compile every kernel variant a `write_index_triton` call can take for keys laid out like `key` (and
    `key_tail`), by writing calls of every size class with every slot padded: nothing is written. Triton
    compiles a variant at its first launch; a decode graph's warm-up compiles only its batch sizes, so a
    prefill chunk of another size class (a one-pass tile of up to ONE_PASS_MAX_TOKENS, the call's length
    a multiple of 16, 1, or neither, or a claim-kernel call) compiled at serving time, a stall vLLM logs as
    "JIT compilation during inference" (about 1 s on an H200; RESULTS, 2026-11-27). Call it outside a CUDA
    graph capture, once per layout."""
    sizes = {1, ONE_PASS_MAX_TOKENS + 1, ONE_PASS_MAX_TOKENS + 16}
    tile = 16
    while tile <= ONE_PASS_MAX_TOKENS:
        sizes |= {tile - 1, tile}
        tile *= 2

    for n in sorted(sizes):
        slots = torch.full((n,), -1, dtype=torch.int64, device=key.device)
        write_index_triton(index, zero_rows_like(key, n), slots, config, workspace,
                           key_tail=None if key_tail is None else zero_rows_like(key_tail, n))
