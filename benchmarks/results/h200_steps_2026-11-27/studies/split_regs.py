"""Registers, stack and shared memory of the MLA attention split compiled offline for sm_90 (no GPU needed:
`sass_token_score.compile_sm90` and the CUDA tools in `sass_token_score.BIN`): the shipped kernel on the wide
plan (one and four 64-row tiles per split; at 4 warps as shipped, and at 8) against `mla_split_variants.py`'s
one-load variant, 16 and 32 heads per program, bf16 and fp8 caches. Run from anywhere:

    python benchmarks/results/h200_steps_2026-11-27/studies/split_regs.py
"""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
import sass_token_score as sts  # noqa: E402
from mla_split_variants import _mla_split_one_load_kernel  # noqa: E402

from asynctls_tip_kernels import sparse_attention as sa  # noqa: E402


def usage(k):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([os.path.join(sts.BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    return out.strip() + f" | shared {k.metadata.shared} B"


def main():
    for heads in (16, 32):
        for fp8 in (False, True):
            cache = "fp8e4nv" if fp8 else "bf16"
            for tiles in (1, 4):
                shipped = dict(
                    q_ptr="bf16", k_ptr=cache, v_ptr=cache, bt_ptr="i32", pos_ptr="i32", m_out_ptr="fp32",
                    l_out_ptr="fp32", acc_out_ptr="fp32", qk_scale=0.1, k_scale_ptr="fp32", v_scale_ptr="fp32",
                    P=2176, stride_qb=heads * 576, stride_qh=576, stride_qd=1, stride_kb=64 * 576, stride_kt=576,
                    stride_kh=576, stride_kd=1, stride_vb=64 * 576, stride_vt=576, stride_vh=576, stride_vd=1,
                    stride_btb=512, stride_pb=2176, stride_ph=2176, HQ=heads, HKV=1, GROUP=heads, DK=576, DV=512,
                    CBS=64, BLOCK_H=heads, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=512, SPLIT_LEN=64 * tiles,
                    NUM_SPLITS=-(-34 // tiles), IEEE=False, PDL=0, KV_FP8=fp8)
                variant = dict(
                    q_ptr="bf16", c_ptr=cache, bt_ptr="i32", pos_ptr="i32", m_out_ptr="fp32", l_out_ptr="fp32",
                    acc_out_ptr="fp32", qk_scale=0.1, k_scale_ptr="fp32", P=2176, stride_qb=heads * 576,
                    stride_qh=576, stride_qd=1, stride_cb=64 * 576, stride_ct=576, stride_cd=1, stride_btb=512,
                    stride_pb=2176, HQ=heads, CBS=64, BLOCK_H=heads, BLOCK_N=64, SPLIT_LEN=64 * tiles,
                    NUM_SPLITS=-(-34 // tiles), LAT=512, RO=64, KV_FP8=fp8, IEEE=False)
                for name, kernel, args, stages, warps in (
                        ("shipped", sa._sparse_attn_split_kernel, shipped, sa.ATTN_WIDE_STAGES, 4),
                        ("shipped at 8 warps", sa._sparse_attn_split_kernel, shipped, sa.ATTN_WIDE_STAGES, 8),
                        ("one load, 2 stages", _mla_split_one_load_kernel, variant, 2, 4),
                        ("one load, 1 stage", _mla_split_one_load_kernel, variant, 1, 4)):
                    try:
                        line = usage(sts.compile_sm90(kernel, args, warps, stages))
                    except Exception as e:  # past shared memory: recorded
                        line = f"{type(e).__name__}: {str(e)[:160]}"
                    print(f"{heads} heads, {cache}, {tiles} tile(s) per split, {name}: {line}", flush=True)


if __name__ == "__main__":
    main()
