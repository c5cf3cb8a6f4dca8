"""Exact attention over a sparse set of positions through the paged KV cache (flash-decoding split-K).

Design
- One program per (sequence, kv head, block of q heads, split of the position list). All q heads of a
  GQA group (up to BLOCK_H of them) share each K/V row the program gathers, so a selected row is read
  from HBM once per kv head, not once per q head. MLA is the same kernel with `Hkv = 1`, the absorbed
  query and `value_cache` a view of the first `Dv` channels of the latent cache (the second read of
  those channels hits L1/L2).
- The position list `(B, Hkv, P)` is split into `num_splits` contiguous chunks; each program keeps an
  online softmax (running max `m`, sum `l`, accumulator `acc`) in float32 and writes it; a second
  small kernel merges the splits. Padding positions (`-1`) are skipped, so the grid depends only on
  shapes: CUDA-graph safe, no host synchronisation.
- Scores `q . k` go through `tl.dot` with float32 accumulation (bf16 products are exact in float32;
  float32 inputs use the IEEE path, not tf32). The probability-value product casts the probabilities to
  the cache dtype, as flash attention does; float32 caches keep float32 throughout.
- fp8 caches (vLLM's `--kv-cache-dtype fp8`: rows hold K / k_scale and V / v_scale): rows are widened to
  the query dtype (exact) for both dots, k_scale joins the softmax scale and v_scale multiplies each
  split's accumulator; both scales are read from device tensors (vLLM may compute them after capture).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# Launch tunables (measured on the H100, see benchmarks/bench_sparse_decode.py --sweep).
ATTN_PROGRAMS_PER_SM = 16  # split the position lists until about this many programs per SM
ATTN_BLOCK_N = 32  # rows per tile (head dims <= 128)
ATTN_NUM_WARPS = 4
ATTN_NUM_STAGES = 2
# With at least ATTN_LONG_SPLIT_MIN_GROUPS (sequence, kv head, head block) groups to split, fewer and longer
# splits with a deeper software pipeline, so the three dependent loads of each tile (position, block table,
# K/V rows) overlap across tiles. H100, budget 2048, per layer (`benchmarks/RESULTS.md`, 2026-11-26): B=8,
# 64K: pipelined step 58.5 -> 57.2 us, standard 71.7 -> 71.2; B=32: 188.6 -> 180.1, 209.2 -> 199.8; MLA with
# 128 heads (32 groups): 0.457 -> 0.390 ms (MLA's wide rows now take the wide plan below instead, up to 128
# groups). Fewer groups (B=1; MLA with 16 heads at B=8) keep the short
# splits: there the long ones were 1.2 us and 3% slower; so do lists too short for ATTN_LONG_SPLIT_MIN_TILES
# tiles per long split (budget 512 at B=8: 20 tiles, 3 per split, about 0.6 us slower). ASYNCTLS_ATTN_LONG_SPLITS=0
# in the environment turns them off (the short splits everywhere, as before 2026-11-26's thirteenth session).
ATTN_LONG_SPLITS = True
ATTN_LONG_SPLIT_MIN_GROUPS = 32
ATTN_LONG_SPLIT_MIN_TILES = 4
ATTN_LONG_SPLIT_PROGRAMS_PER_SM = 3
ATTN_LONG_SPLIT_STAGES = 3
# Long splits resident per SM, by (BLOCK_H q heads per program, BLOCK_DV value width, fp8 cache), for 16-bit queries
# and keys as wide as the values. Registers bound them: an SM has 64K, allocated per thread in steps of 8, to 128
# threads a program (256 where BLOCK_H x BLOCK_DV > 4096). The split kernel's registers per thread (H100, triton
# 3.6; re-measure `n_regs` after a Triton upgrade: `bench_sparse_decode.split_kernel_resources()` after a run of
# each shape, e.g. `benchmarks/results/hd64_split_2026-11-27/studies/`'s scripts), bf16 / fp8 cache: (16, 128) 116 /
# 144-146; (16, 64) 76-77 / 88-92; (32, 128) 108-110 / 178-182; (32, 64) 79-80 / 125-126; (64, 128) 85-86 /
# 99-103; (64, 64) 84-86 / 82; (128, 128) 127-131 / 123; (128, 64) 84-88 / 77-80. (128, 128) on bf16 sits at the
# edge (127 registers fit 2 programs, 131 fit 1): its 1 is the sweep's choice (within 0.5% of the fastest at 4
# points; 2 was up to 2.7% off). Shapes not in the table (float32 queries, whose kernels differ: at (16, 128) one
# spills; head dims up to 32 or over 128; 256 q heads per program; keys wider than values) keep the old count,
# about 3 programs per SM rounded up (unmeasured). The split count minimises the waves of that many programs per SM
# times the tiles each walks (`long_split_count`); the old count left a small second wave at some batches.
# Measured (whole standard step per layer, budget 2048, splits forced; `benchmarks/RESULTS.md`, 2026-11-27):
# - (16, 128), Qwen3-8B shapes: on the H200 its 4 slots and ATTN_LONG_SPLIT_PROGRAM_TILES were fitted to 12 points
#   of a bf16 sweep (the old count 5-14% slower at B=24, 40, 48; the A/B after it 0-10.5% faster at B=4-56). H100:
#   bf16 picks the fastest at all 13 points of the same sweep (out of sample); on fp8, 4 slots were 6-15% slower
#   than the fastest at 11 of 13 points, 3 are within 2.4% everywhere, and the A/B at 14 other batches measured
#   0.877-1.007 of 4's time.
# - (16, 64), Llama-3.2-1B's 32 / 8 heads of 64 (H100): within 0.6% of the fastest of up to 17 forced splits at
#   B = 4-16 (14 points), and the fastest at 22 of the 23 points of the sweep to 8 splits where their count was
#   swept (0.7% off at the other); the A/B at 25 other batches (B=7-128) measured 0.871-1.004 of the old count's
#   time.
# - 32, 64 and 128 q heads per program (64 q heads on 2 kv heads, multi-query with 32, 64 and 128 q heads; H100,
#   1-17 splits forced, not every count): the count from these slots was the fastest at 46 of the 53 points where
#   it was swept, at most 4.1% off; the table before (4 / 3 slots at width 128, the old count at 64) was up to 13%
#   slower. The A/B at 47 other batches measured 0.877-1.006 of its time.
ATTN_LONG_SPLIT_SLOTS_PER_SM = {
    (16, 128, False): 4, (16, 128, True): 3, (16, 64, False): 6, (16, 64, True): 5,
    (32, 128, False): 4, (32, 128, True): 2, (32, 64, False): 6, (32, 64, True): 4,
    (64, 128, False): 2, (64, 128, True): 2, (64, 64, False): 5, (64, 64, True): 5,
    (128, 128, False): 1, (128, 128, True): 2, (128, 64, False): 2, (128, 64, True): 3,
}
# Each program's fixed cost in tiles walked: its query load, its split row written and read back by the merge
# (8 KB of float32 accumulator for 16 heads of 128 against 16 KB of K and V per tile).
ATTN_LONG_SPLIT_PROGRAM_TILES = 2
ATTN_MAXNREG = None  # register cap per thread for the split kernel (None: the compiler's choice)
# Wide value rows (MLA's latent: at least ATTN_WIDE_MIN_DV = 512 channels) with 16-bit queries: one 64-row tile
# per split, 4 warps, 4 stages (which pipeline the key chunks of the tile's dot), instead of 32-row tiles, 8
# warps and 2 stages (or the long splits). H200, 2,176 positions, split + merge from a CUDA graph
# (`benchmarks/RESULTS.md`, 2026-11-27): 16 heads (DeepSeek-V2-Lite) B=16 59.6 -> 41.8 us (fp8 cache 63.6 ->
# 42.5); with 3 stages B=1 19.1 -> 15.6, B=8 37.3 -> 29.4, B=32 111.7 -> 75.5 (against the long splits); 20
# heads (GLM-style, 32 per program, where 4 warps spill registers and still win) B=16 89.0 -> 47.1; 128 heads
# (DeepSeek-V3: 4 head blocks of 32) B=8 138.8 -> 85.2 (against the long splits). Whole step at 32K, budget
# 2048, against the long splits (`benchmarks/results/index_write_2026-11-27/attn_ab/`): 128 heads B=8 357.8 ->
# 310.7 us, B=16 668.6 -> 570.9, B=32 1271.8 -> 1102.4; 16 heads B=32 164.3 -> 123.8, B=128 462.0 -> 405.7; 20
# heads B=64 421.8 -> 280.6. It applies with at most ATTN_WIDE_MAX_HEAD_BLOCKS head blocks per kv head; where the
# long splits would apply, one tile per split up to ATTN_WIDE_LONG_MAX_GROUPS (sequence, kv head, head block)
# groups (the most measured so), ATTN_WIDE_MANY_GROUPS_SPLIT_TILES tiles past them. Its many splits (34 at budget
# 2048, where the long splits take 4 to 12) grow the float32 split buffers to batch x heads x splits x 512: the
# plan stays below ATTN_WIDE_MAX_SPLIT_BYTES of them (the largest measured, 285 MB at 128 groups of 32 heads). A
# server's decode workspace arena is sized for its largest batch outside vLLM's KV-cache budget (like its CUDA
# graphs, from the memory `gpu_memory_utilization` leaves): at budget 2048 and batches up to 512 it grew from 33
# to 136 MiB for 16 heads and from 128 to 272 MiB for 128. With the many-groups splits below, the largest split
# buffers over batches up to 512 are 144 MiB (16 heads), 180 (20) and 288 (128); up to vLLM's default of 1,024
# sequences on large GPUs, 288 MiB for all three (the bytes cap: at B=1024 for 16 heads, B=819 for 20), against
# 136 / 170 / 272 before.
# Not measured, so on the old plan: head dims of 256, float32 (past shared memory), more split-buffer bytes.
ATTN_WIDE_MIN_DV = 512
ATTN_WIDE_BLOCK_N = 64
ATTN_WIDE_NUM_WARPS = 4
ATTN_WIDE_STAGES = 4
ATTN_WIDE_MAX_HEAD_BLOCKS = 4
ATTN_WIDE_LONG_MAX_GROUPS = 128
ATTN_WIDE_MAX_SPLIT_BYTES = 288 * 2**20
ATTN_WIDE_SPLIT_TILES = 1  # 64-row tiles each split of the wide plan walks
# Past ATTN_WIDE_LONG_MAX_GROUPS groups, where the long splits would apply, the wide plan with this many tiles
# per split (None: the long splits there, as before). H200, 16 heads, fp8 cache, 32K, budget 2048, whole step
# from a CUDA graph (`benchmarks/RESULTS.md`, 2026-11-27): B=136 753.5 us on the long splits (3 splits of 736
# rows, 8 warps), 452.9 wide with 1 tile per split, 420.6 with 2, 417.4 with 4, 444.0 with 8; B=256 1173.0 ->
# 816.7 / 749.1 / 736.4 / 755.7. Below the limit one tile stays: 4 tiles were 6% slower at B=64 for 20 heads
# (280.0 -> 295.8) and 12% at B=16 for 16 (82.0 -> 91.8), though 2% faster at B=64 for 16 heads (3 tiles: 8%;
# more tiles below the limit is open). The A/B against the long splits: 16 heads B=136 753.8 -> 413.6 us, B=160
# 789.9 -> 480.6; 20 heads B=136 813.4 -> 555.4, B=200 1176.4 -> 786.9; 128 heads B=48 1912.8 -> 1676.6, B=64
# 2417.5 -> 2180.9; bf16 cache, 16 heads B=136 553.4 -> 414.0. Past ATTN_WIDE_MAX_SPLIT_BYTES of split buffers
# the long splits still apply.
ATTN_WIDE_MANY_GROUPS_SPLIT_TILES: int | None = 4
# The split merge holds all of a head's splits in one tile of up to MERGE_TILE_ELEMENTS float32 accumulator
# values (every plan measured so far: budget 2048 gives 34 splits for MLA's 512-wide rows, a 64 x 512 tile);
# past that (large budgets at small batches: 8K at B=1 gives 130 splits) it walks chunks of at most
# MERGE_CHUNK_ELEMENTS. Compiled offline for sm_90 (4 warps): one 256 x 512 tile spills 3,872 bytes per
# thread to the stack, a 128 x 512 one 128 bytes, chunks of 32 x 512 none (172 registers).
MERGE_TILE_ELEMENTS = 32768
MERGE_CHUNK_ELEMENTS = 16384


def zero_rows_like(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros shaped like `t` with `n` rows along dim 0 and `t`'s own strides: what a warm-up launch passes
    for a call's input, since Triton specialises a kernel on its arguments' strides."""
    return torch.empty_strided((n, *t.shape[1:]), t.stride(), dtype=t.dtype, device=t.device).zero_()


def require_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(f"{op} (Triton) needs CUDA tensors, got one on {t.device}; use the "
                               "reference in sparse_decode_reference.py on CPU")


def float32_dots(dtype: torch.dtype) -> bool:
    """Whether kernels should run their tl.dot in IEEE float32: always for float32 data, and under the
    interpreter, whose bf16/fp16 tl.dot returns garbage (triton 3.9, checked 2026-11-25)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def inline_asm_enabled(tensor: torch.Tensor) -> bool:
    """Whether kernels may use PTX inline assembly: an NVIDIA GPU, not the interpreter."""
    return tensor.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


# Programmatic dependent launch (sm90+): each decode kernel is launched so that it may start while
# the kernel before it drains, and waits (`gdc_wait`) before it reads anything. True = on where
# supported; False turns it off (benchmarks compare both), as does ASYNCTLS_PDL=0.
USE_PDL: bool = True
# Where a kernel lets the next one launch (`gdc_launch_dependents`): "start" (right after its own
# wait) or "end" (once its main loop is done, so that waiting dependents take no SM slot while it runs).
PDL_TRIGGER: str = "end"
_PDL_MODES = {"start": 1, "end": 2}
_pdl_support: dict = {}
# Set by `pdl_scope` around one operator call (per thread and task); None: USE_PDL decides.
_pdl_scope: contextvars.ContextVar = contextvars.ContextVar("asynctls_pdl_scope", default=None)


@contextlib.contextmanager
def pdl_scope(on: bool):
    """Kernels launched inside use programmatic dependent launch only if `on` (and `pdl_enabled`'s other
    conditions hold). The operator picks it per schedule: see `sparse_decode.PDL_STANDARD_STEP`."""
    token = _pdl_scope.set(bool(on))
    try:
        yield
    finally:
        _pdl_scope.reset(token)


def pdl_enabled(tensor: torch.Tensor) -> bool:
    """Whether kernels on `tensor`'s device launch with programmatic dependent launch: USE_PDL, not
    inside `pdl_scope(False)`, an NVIDIA GPU of capability 9.0 or newer (not ROCm), a Triton with grid
    dependency control, not the interpreter, not ASYNCTLS_PDL=0."""
    if not USE_PDL or _pdl_scope.get() is False or not tensor.is_cuda or torch.version.hip is not None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("ASYNCTLS_PDL") == "0":
        return False
    device = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if device not in _pdl_support:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions
            from triton.language.extra import cuda as tl_cuda
            has_api = hasattr(tl_cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
        except ImportError:
            has_api = False
        _pdl_support[device] = has_api and torch.cuda.get_device_capability(device)[0] >= 9
    return _pdl_support[device]


def pdl_launch(tensor: torch.Tensor) -> dict:
    """Launch keyword arguments and the kernels' `PDL` constexpr for `tensor`'s device."""
    if not pdl_enabled(tensor):
        return {"PDL": 0}
    if PDL_TRIGGER not in _PDL_MODES:
        raise ValueError(f"PDL_TRIGGER must be one of {sorted(_PDL_MODES)}; got {PDL_TRIGGER!r}")
    return {"PDL": _PDL_MODES[PDL_TRIGGER], "launch_pdl": True}


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    # PDL 1 or 2: wait for the previous kernel's writes; PDL 1 then lets the next kernel launch at once.
    tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_trigger(PDL: tl.constexpr):
    # PDL 2: let the next kernel launch now (its programs wait for this kernel's end before reading).
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gathered_qk(q_base, h_mask, k_row, valid, stride_qd, stride_kd, DK: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr = False):
    # s[h, n] = q[h] . K[n] for BLOCK_H query rows (q_base: (BLOCK_H, 1) pointers, h_mask) and BLOCK_N
    # gathered key rows (k_row: (BLOCK_N,) pointers, valid), in BLOCK_DK-channel steps; tensor-core
    # dots (IEEE float32 for float32 data; fp8 keys widened to the query dtype), float32 accumulation.
    s = tl.zeros((BLOCK_H, BLOCK_N), tl.float32)
    for d0 in range(0, DK, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        d_mask = offs_d < DK
        q = tl.load(q_base + offs_d[None, :] * stride_qd, mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        k = tl.load(k_row[:, None] + offs_d[None, :] * stride_kd, mask=valid[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            s += tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        elif KV_FP8:
            s += tl.dot(q, tl.trans(k.to(q.dtype)))  # fp8 -> bf16/fp16 is exact
        else:
            s += tl.dot(q.to(k.dtype), tl.trans(k))
    return s


@triton.jit
def _sparse_attn_split_kernel(
    q_ptr,  # query dtype (bf16/fp16/fp32), (B, Hq, DK), any strides
    k_ptr,  # cache dtype, (num_cache_blocks, CBS, Hkv, DK), any strides
    v_ptr,  # cache dtype, (num_cache_blocks, CBS, Hkv, DV), any strides (MLA: a view of k)
    bt_ptr,  # int32, (B, max_blocks_per_seq)
    pos_ptr,  # int32, (B, Hkv, P), -1 = padding
    m_out_ptr,  # float32, (B, Hq, NUM_SPLITS): running max (log2 domain)
    l_out_ptr,  # float32, (B, Hq, NUM_SPLITS): running sum
    acc_out_ptr,  # float32, (B, Hq, NUM_SPLITS, DV): unnormalised output
    qk_scale,  # float: softmax scale * log2(e)
    k_scale_ptr,  # float32 (1,): fp8 caches hold K / k_scale (KV_FP8 only)
    v_scale_ptr,  # float32 (1,): and V / v_scale
    P,  # int: positions per (sequence, kv head)
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb,
    stride_pb, stride_ph,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,  # Hq // Hkv
    DK: tl.constexpr,
    DV: tl.constexpr,
    CBS: tl.constexpr,  # cache block size
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SPLIT_LEN: tl.constexpr,  # positions per split (multiple of BLOCK_N)
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,  # float32 cache: exact float32 dots
    PDL: tl.constexpr,  # programmatic dependent launch: wait for the previous kernel first
    KV_FP8: tl.constexpr = False,  # fp8 K/V: rows widened to the query dtype, scales applied per tensor
):
    # For q head h of kv group g and positions p_1..p_n of this split:
    #   s_i = scale * q_h . K[p_i]        (K[p] = key_cache[block_table[b, p // CBS], p % CBS, g])
    #   m = max_i s_i,  l = sum_i exp(s_i - m),  acc = sum_i exp(s_i - m) V[p_i]
    # (kept in base 2: s is pre-multiplied by log2(e)). The merge kernel combines the splits.
    # fp8 caches hold K / k_scale and V / v_scale: k_scale joins qk_scale, v_scale multiplies acc at the end.
    if PDL:
        _pdl_wait(PDL)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    pid_bg = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bg // HKV
    g = pid_bg % HKV

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # head index inside the group
    h_mask = offs_h < GROUP
    heads = g * GROUP + offs_h  # (BLOCK_H,) q head ids
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)

    q_base = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    pos_base = pos_ptr + b * stride_pb + g * stride_ph
    start = pid_s * SPLIT_LEN
    for n0 in range(0, SPLIT_LEN, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        pos = tl.load(pos_base + offs_n, mask=offs_n < P, other=-1)  # (BLOCK_N,)
        valid = pos >= 0
        pos_c = tl.where(valid, pos, 0)
        phys = tl.load(bt_ptr + b * stride_btb + pos_c // CBS, mask=valid, other=0).to(tl.int64)
        row = pos_c % CBS
        k_row = k_ptr + phys * stride_kb + row * stride_kt + g * stride_kh  # (BLOCK_N,) pointers

        s = _gathered_qk(q_base, h_mask, k_row, valid, stride_qd, stride_kd, DK, BLOCK_H, BLOCK_N, BLOCK_DK, IEEE,
                         KV_FP8)
        s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_row = v_ptr + phys * stride_vb + row * stride_vt + g * stride_vh
        v = tl.load(v_row[:, None] + offs_dv[None, :] * stride_vd, mask=valid[:, None] & dv_mask[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        elif KV_FP8:
            compute = q_ptr.dtype.element_ty
            acc = acc * alpha[:, None] + tl.dot(p.to(compute), v.to(compute))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    _pdl_trigger(PDL)
    out_row = (b * HQ + heads) * NUM_SPLITS + pid_s  # (BLOCK_H,)
    tl.store(m_out_ptr + out_row, m_i, mask=h_mask)
    tl.store(l_out_ptr + out_row, l_i, mask=h_mask)
    tl.store(acc_out_ptr + out_row[:, None] * DV + offs_dv[None, :], acc, mask=h_mask[:, None] & dv_mask[None, :])


@triton.jit
def _sparse_attn_merge_kernel(
    m_ptr,  # float32, (B * Hq, NUM_SPLITS)
    l_ptr,  # float32, (B * Hq, NUM_SPLITS)
    acc_ptr,  # float32, (B * Hq, NUM_SPLITS, DV)
    out_ptr,  # output dtype, (B, Hq, DV), any strides
    stride_ob, stride_oh, stride_od,
    HQ: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits per tile: all of them (CHUNKS == 1), or a chunk
    CHUNKS: tl.constexpr,  # tiles of BLOCK_S splits (more than one only past MERGE_TILE_ELEMENTS, see merge_plan)
    PDL: tl.constexpr,
):
    # out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s; a head that saw no
    # valid position (every m_s = -inf) gets zeros instead of 0/0.
    if PDL:
        _pdl_wait(PDL)
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    if CHUNKS == 1:
        s_mask = offs_s < NUM_SPLITS
        m = tl.load(m_ptr + pid * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
        l = tl.load(l_ptr + pid * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_max)  # (BLOCK_S,)
        acc = tl.load(
            acc_ptr + (pid * NUM_SPLITS + offs_s[:, None]) * DV + offs_dv[None, :],
            mask=s_mask[:, None] & dv_mask[None, :],
            other=0.0,
        )
        _pdl_trigger(PDL)
        num = tl.sum(acc * w[:, None], axis=0)
        den = tl.sum(l * w, axis=0)
    else:
        # Many splits (large budgets at small batches): two passes over chunks, so no tile holds every
        # split's accumulator row.
        m_run = tl.full((BLOCK_S,), float("-inf"), tl.float32)
        for c in range(CHUNKS):
            s = c * BLOCK_S + offs_s
            m_run = tl.maximum(m_run, tl.load(m_ptr + pid * NUM_SPLITS + s, mask=s < NUM_SPLITS, other=float("-inf")))
        m_max = tl.max(m_run, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        num = tl.zeros((BLOCK_DV,), tl.float32)
        den_run = tl.zeros((BLOCK_S,), tl.float32)
        for c in range(CHUNKS):
            s = c * BLOCK_S + offs_s
            s_mask = s < NUM_SPLITS
            w = tl.exp2(tl.load(m_ptr + pid * NUM_SPLITS + s, mask=s_mask, other=float("-inf")) - m_max)
            den_run += tl.load(l_ptr + pid * NUM_SPLITS + s, mask=s_mask, other=0.0) * w
            acc = tl.load(acc_ptr + (pid * NUM_SPLITS + s[:, None]) * DV + offs_dv[None, :],
                          mask=s_mask[:, None] & dv_mask[None, :], other=0.0)
            num += tl.sum(acc * w[:, None], axis=0)
        _pdl_trigger(PDL)
        den = tl.sum(den_run, axis=0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_dv * stride_od, out.to(out_ptr.dtype.element_ty), mask=dv_mask)


def merge_plan(num_splits: int, head_dim_v: int) -> dict:
    """Launch shape of the split merge: every split in one tile while it holds at most MERGE_TILE_ELEMENTS
    accumulator values, else chunks of a power of two splits holding at most MERGE_CHUNK_ELEMENTS (one split
    at least)."""
    block_s, block_dv = triton.next_power_of_2(num_splits), triton.next_power_of_2(head_dim_v)
    if block_s * block_dv <= MERGE_TILE_ELEMENTS:
        return dict(BLOCK_S=block_s, CHUNKS=1)
    block_s = 1 << (max(1, MERGE_CHUNK_ELEMENTS // block_dv).bit_length() - 1)
    return dict(BLOCK_S=block_s, CHUNKS=triton.cdiv(num_splits, block_s))


@functools.lru_cache(maxsize=None)
def long_split_count(programs: int, tiles: int, slots: int, min_tiles: int, program_tiles: int) -> int:
    """Splits of each of `programs` position lists of `tiles` tiles when `slots` programs run at once: the
    count with the fewest waves times what each program walks (its tiles and `program_tiles`), at least
    `min_tiles` tiles per split; ties go to fewer splits (less to merge). Cached: `attention_plan` runs on
    every eager call."""
    best, best_cost = 1, None
    for splits in range(1, max(1, tiles // min_tiles) + 1):
        per_split = -(-tiles // splits)
        waves = -(-programs * -(-tiles // per_split) // slots)
        cost = waves * (per_split + program_tiles)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


def attention_plan(batch: int, num_q_heads: int, num_kv_heads: int, num_positions: int, head_dim_k: int,
                   head_dim_v: int, num_sms: int = 132, query_bytes: int = 2, kv_bytes: int | None = None) -> dict:
    """Launch shape for `sparse_attention`, a function of shapes only (so it is CUDA-graph stable).
    `query_bytes`: the query's element size; the wide-row plan's deep pipeline is for 16-bit rows (float32
    ones would stage past shared memory). `kv_bytes`: the KV cache's element size (None: `query_bytes`, an
    unquantised cache); 1 (fp8) changes the long splits' count."""
    group = num_q_heads // num_kv_heads
    block_dv = triton.next_power_of_2(head_dim_v)
    # Heads per program: at least 16 rows for tl.dot; cap the float32 accumulator at 16K elements.
    block_h = max(16, triton.next_power_of_2(group))
    while block_h > 16 and block_h * block_dv > 16384:
        block_h //= 2
    head_blocks = triton.cdiv(group, block_h)
    block_n = ATTN_BLOCK_N if block_dv <= 128 else 32
    block_dk = min(128, triton.next_power_of_2(head_dim_k)) if block_dv <= 128 else 64
    # Enough programs to fill the chip (several times over with short splits), but no split shorter than one tile.
    programs = batch * num_kv_heads * head_blocks
    tiles = triton.cdiv(max(num_positions, 1), block_n)
    long_splits = (ATTN_LONG_SPLITS and os.environ.get("ASYNCTLS_ATTN_LONG_SPLITS") != "0"
                   and programs >= ATTN_LONG_SPLIT_MIN_GROUPS
                   and tiles >= ATTN_LONG_SPLIT_MIN_TILES
                   * triton.cdiv(ATTN_LONG_SPLIT_PROGRAMS_PER_SM * num_sms, programs))
    many_groups = long_splits and programs > ATTN_WIDE_LONG_MAX_GROUPS
    split_tiles = ATTN_WIDE_MANY_GROUPS_SPLIT_TILES if many_groups else ATTN_WIDE_SPLIT_TILES
    if split_tiles is not None and split_tiles < 1:
        name = "ATTN_WIDE_MANY_GROUPS_SPLIT_TILES" if many_groups else "ATTN_WIDE_SPLIT_TILES"
        raise ValueError(f"sparse_attention: {name}={split_tiles}; allowed: a tile count >= 1"
                         + (" or None" if many_groups else ""))
    wide_tiles = triton.cdiv(max(num_positions, 1), ATTN_WIDE_BLOCK_N)
    split_tiles = min(split_tiles, wide_tiles) if split_tiles is not None else None  # no split past the list
    wide_splits = triton.cdiv(wide_tiles, split_tiles or 1)
    wide = (head_dim_v >= ATTN_WIDE_MIN_DV and query_bytes <= 2 and head_blocks <= ATTN_WIDE_MAX_HEAD_BLOCKS
            and split_tiles is not None
            and batch * num_q_heads * wide_splits * head_dim_v * 4 <= ATTN_WIDE_MAX_SPLIT_BYTES)
    if wide:
        return dict(BLOCK_H=block_h, BLOCK_N=ATTN_WIDE_BLOCK_N, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                    SPLIT_LEN=ATTN_WIDE_BLOCK_N * split_tiles, NUM_SPLITS=wide_splits,
                    head_blocks=head_blocks,
                    num_warps=ATTN_WIDE_NUM_WARPS, num_stages=ATTN_WIDE_STAGES)
    slots = ATTN_LONG_SPLIT_SLOTS_PER_SM.get((block_h, block_dv, kv_bytes == 1)) if query_bytes == 2 else None
    if long_splits and slots and triton.next_power_of_2(head_dim_k) == block_dv:
        want_splits = long_split_count(programs, tiles, slots * num_sms, ATTN_LONG_SPLIT_MIN_TILES,
                                       ATTN_LONG_SPLIT_PROGRAM_TILES)
    else:
        per_sm = ATTN_LONG_SPLIT_PROGRAMS_PER_SM if long_splits else ATTN_PROGRAMS_PER_SM
        want_splits = max(1, triton.cdiv(per_sm * num_sms, programs))
    tiles_per_split = max(1, triton.cdiv(tiles, want_splits))
    num_splits = triton.cdiv(tiles, tiles_per_split)
    return dict(BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                SPLIT_LEN=tiles_per_split * block_n, NUM_SPLITS=num_splits, head_blocks=head_blocks,
                num_warps=ATTN_NUM_WARPS if block_h * block_dv <= 4096 else 8,
                num_stages=ATTN_LONG_SPLIT_STAGES if long_splits else ATTN_NUM_STAGES)


class AttentionWorkspace:
    """Float32 split buffers for `sparse_attention`, allocated once per shape (CUDA-graph friendly)."""

    def __init__(self, batch: int, num_q_heads: int, num_splits: int, head_dim_v: int, device,
                 empty=None) -> None:
        # empty(shape, dtype) -> tensor: where the buffers come from (default: fresh allocations).
        empty = empty or (lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device))
        self.m = empty((batch, num_q_heads, num_splits), torch.float32)
        self.l = empty((batch, num_q_heads, num_splits), torch.float32)
        self.acc = empty((batch, num_q_heads, num_splits, head_dim_v), torch.float32)


FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def check_kv_scales(op: str, key_cache: torch.Tensor, kv_scales) -> None:
    """fp8 caches need `kv_scales` = (k_scale, v_scale): one-element float32 tensors on the cache's device
    (vLLM's `layer._k_scale`, `layer._v_scale`); other caches must not get them."""
    fp8 = key_cache.dtype in FP8_CACHE_DTYPES

    def scale_ok(t):
        return (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == 1
                and t.device == key_cache.device)

    if fp8 and not (isinstance(kv_scales, (tuple, list)) and len(kv_scales) == 2 and all(map(scale_ok, kv_scales))):
        got = kv_scales if kv_scales is None or not isinstance(kv_scales, (tuple, list)) else [
            f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            for t in kv_scales]
        raise ValueError(f"{op}: an fp8 ({key_cache.dtype}) KV cache needs kv_scales = (k_scale, v_scale), one-element "
                         f"float32 tensors on {key_cache.device}; got {got}")
    if not fp8 and kv_scales is not None:
        raise ValueError(f"{op}: kv_scales apply to fp8 KV caches only; the cache is {key_cache.dtype}")


def _check(query, key_cache, value_cache, block_table, positions, kv_scales=None):
    if query.dim() != 3 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError(
            f"sparse_attention: query must be (B, Hq, Dk) and caches (blocks, block_size, Hkv, D); got "
            f"query {tuple(query.shape)}, key_cache {tuple(key_cache.shape)}, value_cache {tuple(value_cache.shape)}"
        )
    require_triton_device("sparse_attention", query, key_cache, value_cache)
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (
            torch.bfloat16, torch.float16, torch.float32, *FP8_CACHE_DTYPES):
        raise ValueError(f"sparse_attention: key/value cache dtype must match and be bf16/fp16/fp32/fp8 (e4m3, "
                         f"e5m2); got {key_cache.dtype}/{value_cache.dtype}")
    check_kv_scales("sparse_attention", key_cache, kv_scales)
    if key_cache.dtype in FP8_CACHE_DTYPES and query.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"sparse_attention: with an fp8 KV cache the query must be bf16/fp16/fp32 (dequantise "
                         f"an fp8 query first); got {query.dtype}")
    if block_table.dtype != torch.int32 or positions.dtype != torch.int32:
        raise ValueError(f"sparse_attention: block_table and positions must be int32; got {block_table.dtype}, "
                         f"{positions.dtype}")
    if block_table.stride(1) != 1 or not positions.is_contiguous():
        raise ValueError("sparse_attention: block_table rows and positions must be contiguous")
    B, Hq, Dk = query.shape
    Hkv = key_cache.shape[2]
    if Hq % Hkv != 0 or key_cache.shape[3] != Dk or positions.shape[:2] != (B, Hkv):
        raise ValueError(f"sparse_attention: shapes disagree: query {tuple(query.shape)}, key_cache "
                         f"{tuple(key_cache.shape)}, positions {tuple(positions.shape)}")


def sparse_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    workspace: AttentionWorkspace | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact attention of `query` (B, Hq, Dk) over `positions` (B, Hkv, P; -1 = padding) -> (B, Hq, Dv).

    Same contract as the reference's `sparse_attention`. `out` and `workspace` may be preallocated
    (decode under CUDA graphs); the launch shape depends on tensor shapes only. An fp8 cache (vLLM's
    `--kv-cache-dtype fp8`: stored = value / scale) takes `kv_scales` = (k_scale, v_scale), one-element
    float32 tensors on the device, read by the kernel (no host synchronisation): the result is the
    reference's over the dequantised caches.
    """
    _check(query, key_cache, value_cache, block_table, positions, kv_scales)
    kv_fp8 = key_cache.dtype in FP8_CACHE_DTYPES
    B, Hq, Dk = query.shape
    Hkv = key_cache.shape[2]
    Dv = value_cache.shape[3]
    P = positions.shape[2]
    plan = attention_plan(B, Hq, Hkv, P, Dk, Dv, query_bytes=query.element_size(),
                          kv_bytes=key_cache.element_size())
    if workspace is None:
        workspace = AttentionWorkspace(B, Hq, plan["NUM_SPLITS"], Dv, query.device)
    elif workspace.acc.shape != (B, Hq, plan["NUM_SPLITS"], Dv):
        raise ValueError(f"sparse_attention: workspace holds {tuple(workspace.acc.shape)} split buffers; this launch "
                         f"needs {(B, Hq, plan['NUM_SPLITS'], Dv)}: NUM_SPLITS={plan['NUM_SPLITS']} from "
                         f"ATTN_PROGRAMS_PER_SM={ATTN_PROGRAMS_PER_SM}, ATTN_BLOCK_N={ATTN_BLOCK_N}, "
                         f"ATTN_WIDE_BLOCK_N={ATTN_WIDE_BLOCK_N}, "
                         f"ATTN_WIDE_MAX_HEAD_BLOCKS={ATTN_WIDE_MAX_HEAD_BLOCKS}, "
                         f"ATTN_WIDE_LONG_MAX_GROUPS={ATTN_WIDE_LONG_MAX_GROUPS}, "
                         f"ATTN_WIDE_SPLIT_TILES={ATTN_WIDE_SPLIT_TILES}, "
                         f"ATTN_WIDE_MANY_GROUPS_SPLIT_TILES={ATTN_WIDE_MANY_GROUPS_SPLIT_TILES}, "
                         f"ATTN_WIDE_MAX_SPLIT_BYTES={ATTN_WIDE_MAX_SPLIT_BYTES}, ATTN_LONG_SPLITS={ATTN_LONG_SPLITS}, "
                         f"ATTN_LONG_SPLIT_SLOTS_PER_SM={ATTN_LONG_SPLIT_SLOTS_PER_SM}, a {query.dtype} query "
                         f"and a {key_cache.dtype} cache (a workspace built for other shapes, another query or "
                         "cache dtype or other launch settings)")
    if out is None:
        out = torch.empty(B, Hq, Dv, dtype=query.dtype, device=query.device)
    grid = (B * Hkv, plan["head_blocks"], plan["NUM_SPLITS"])
    pdl = pdl_launch(query)
    _sparse_attn_split_kernel[grid](
        query, key_cache, value_cache, block_table, positions,
        workspace.m, workspace.l, workspace.acc,
        float(scale) * _LOG2E, *(kv_scales if kv_fp8 else (workspace.m, workspace.m)), P,
        query.stride(0), query.stride(1), query.stride(2),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), value_cache.stride(3),
        block_table.stride(0),
        positions.stride(0), positions.stride(1),
        HQ=Hq, HKV=Hkv, GROUP=Hq // Hkv, DK=Dk, DV=Dv, CBS=key_cache.shape[1],
        BLOCK_H=plan["BLOCK_H"], BLOCK_N=plan["BLOCK_N"], BLOCK_DK=plan["BLOCK_DK"], BLOCK_DV=plan["BLOCK_DV"],
        SPLIT_LEN=plan["SPLIT_LEN"], NUM_SPLITS=plan["NUM_SPLITS"],
        IEEE=float32_dots(query.dtype if kv_fp8 else key_cache.dtype), KV_FP8=kv_fp8, **pdl,
        **({"maxnreg": ATTN_MAXNREG} if ATTN_MAXNREG else {}),
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    _sparse_attn_merge_kernel[(B * Hq,)](
        workspace.m, workspace.l, workspace.acc, out,
        out.stride(0), out.stride(1), out.stride(2),
        HQ=Hq, DV=Dv, BLOCK_DV=plan["BLOCK_DV"], NUM_SPLITS=plan["NUM_SPLITS"],
        **merge_plan(plan["NUM_SPLITS"], Dv), **pdl,
        num_warps=4,
    )
    return out
