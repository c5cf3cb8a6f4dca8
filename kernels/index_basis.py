"""The index's coordinates on the GPU (`index_basis="pca"`): rows rotated by each kv head's basis.

`rotate_triton(x, basis)` computes `out[n, h * G + g] = basis[h] @ x[n, h * G + g]` for x (N, Hkv * G, D)
(the query with G = Hq // Hkv, or new keys with G = 1) in one launch, instead of the several launches of
`torch.einsum` (cast, permutes, batched matmul, cast back: about 20 us per layer and decode step in the
pipelined step on the H100, measured 2026-11-26). One program per (kv head, tile of BLOCK_R rows of that
head, tile of BLOCK_E output coordinates), tensor-core dots with three TF32 passes ("tf32x3", about float32
accuracy), the output cast to `out`'s dtype. A decode step's query is a few dozen rows, so the launch is
latency-bound: the output tiles are programs of their own and a head dim of up to 128 is one input step
(H100, B=8, 64K, `index_basis="pca"`: the pipelined step 65.7 -> 63.8 us per layer with the launch on the
token stream). It equals the reference's `rotate_query` / `rotate_keys` up to float32 rounding (a bf16
output may then differ by one unit in the last place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attention import _pdl_trigger, _pdl_wait, pdl_launch, require_triton_device

ROTATE_BLOCK_R = 16  # rows (tokens x heads of the group) per program
ROTATE_BLOCK_E = 64  # output coordinates per program
ROTATE_BLOCK_D = 128  # input coordinates per step


# R (rows of one kv head's group) follows the call's row count: unspecialised, so a decode batch run outside any
# CUDA graph (a step mixing prefill and decode rows) never compiles a variant of its own while serving.
@triton.jit(do_not_specialize=["R"])
def _rotate_kernel(x_ptr, basis_ptr, out_ptr, R, stride_xn, stride_xh, stride_xd, stride_on, stride_oh,
                   GROUP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    # Row r of kv head h is x[r // GROUP, h * GROUP + r % GROUP]; R = N * GROUP rows per head.
    # out[r, e] = sum_d x[r, d] basis[h, e, d]: tensor-core dots in three TF32 passes (about float32
    # accuracy), in loops that are not unrolled (an IEEE float32 tl.dot is lowered to unrolled FMAs on
    # sm_90, and D = 576 then took minutes to compile; plain FMA tiles took 60 us for one query).
    if PDL:
        _pdl_wait(PDL)
    h = tl.program_id(0)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    r_mask = offs_r < R
    e_mask = offs_e < D
    n = (offs_r // GROUP).to(tl.int64)
    head = h * GROUP + offs_r % GROUP
    x_row = x_ptr + n * stride_xn + head * stride_xh
    o_row = out_ptr + n * stride_on + head * stride_oh
    b_head = basis_ptr + h * (D * D)
    acc = tl.zeros((BLOCK_R, BLOCK_E), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(x_row[:, None] + offs_d[None, :] * stride_xd, mask=r_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)  # (R, Dc)
        b = tl.load(b_head + offs_e[:, None] * D + offs_d[None, :], mask=e_mask[:, None] & d_mask[None, :],
                    other=0.0)  # (E, Dc)
        acc += tl.dot(x, tl.trans(b), input_precision="tf32x3")
    _pdl_trigger(PDL)
    tl.store(o_row[:, None] + offs_e[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None] & e_mask[None, :])


def rotate_triton(x: torch.Tensor, basis: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, Hkv * G, D) any strides (last one 1 or not), basis (Hkv, D, D) float32 contiguous ->
    (N, Hkv * G, D) contiguous in x's dtype (or into `out`): row n, head h * G + g rotated by basis[h]."""
    require_triton_device("rotate", x, basis)
    if x.dim() != 3 or basis.dim() != 3 or basis.shape[1:] != (x.shape[2], x.shape[2]) or x.shape[1] % basis.shape[0]:
        raise ValueError(f"rotate: x must be (N, Hkv * G, D) and basis (Hkv, D, D) float32; got x {tuple(x.shape)}, "
                         f"basis {tuple(basis.shape)}")
    if basis.dtype != torch.float32 or not basis.is_contiguous():
        raise ValueError(f"rotate: basis must be contiguous float32; got {basis.dtype}")
    N, H, D = x.shape
    Hkv = basis.shape[0]
    G = H // Hkv
    if out is None:
        out = torch.empty(N, H, D, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or not out.is_contiguous():
        raise ValueError(f"rotate: out must be contiguous {tuple(x.shape)}; got {tuple(out.shape)}")
    if N == 0:
        return out
    block_e = min(ROTATE_BLOCK_E, triton.next_power_of_2(D))
    block_d = min(ROTATE_BLOCK_D, triton.next_power_of_2(D))
    grid = (Hkv, triton.cdiv(N * G, ROTATE_BLOCK_R), triton.cdiv(D, block_e))
    _rotate_kernel[grid](x, basis, out, N * G, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                         GROUP=G, D=D, BLOCK_R=ROTATE_BLOCK_R, BLOCK_E=block_e, BLOCK_D=block_d, **pdl_launch(x),
                         num_warps=4)
    return out


def rotate_query_triton(query: torch.Tensor, index) -> torch.Tensor:
    """`sparse_decode_reference.rotate_query` in one launch: the query (B, Hq, D) in the index's
    coordinates, in its own dtype (the query itself without a basis)."""
    return query if index.basis is None else rotate_triton(query, index.basis)


def rotate_keys_triton(key: torch.Tensor, index) -> torch.Tensor:
    """`sparse_decode_reference.rotate_keys` in one launch: keys (N, Hkv, D) cast to `index.key_dtype`,
    rotated when the index has a basis."""
    key = key.to(index.key_dtype)
    return key if index.basis is None else rotate_triton(key, index.basis)
