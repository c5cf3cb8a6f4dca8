"""Registers and stack of the attention merge kernel compiled offline for sm_90 (no GPU needed: Triton's
compiler and the CUDA tools `sass_token_score.BIN` finds), one tile of every split against `merge_plan`'s
chunks, at MLA's 512-wide and GQA's 128-wide value rows. Run from anywhere:

    python benchmarks/results/mla_stages_2026-11-27/studies/merge_regs.py
"""
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "benchmarks"))
import sass_token_score as sts
from asynctls_tip_kernels import sparse_attention as sa

def compile_(kernel, args, num_warps, num_stages=2):
    sig, consts, attrs = {}, {}, {}
    cn = {p.name for p in kernel.params if p.is_constexpr}
    for i, name in enumerate(kernel.arg_names):
        v = args[name]
        if name in cn or (v == 1 and isinstance(v, int)):
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = "*" + v, [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))

def res(k):
    f = tempfile.NamedTemporaryFile(suffix=".cubin", delete=False)
    f.write(k.asm["cubin"])
    f.close()
    return subprocess.run([os.path.join(sts.BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout.strip().splitlines()[-1]

for dv, ns in ((512, 34), (512, 130), (512, 260), (128, 130), (128, 520)):
    base = dict(m_ptr="fp32", l_ptr="fp32", acc_ptr="fp32", out_ptr="bf16", stride_ob=dv * 16, stride_oh=dv, stride_od=1,
                HQ=16, DV=dv, BLOCK_DV=triton.next_power_of_2(dv), NUM_SPLITS=ns, PDL=0)
    old = dict(base, BLOCK_S=triton.next_power_of_2(ns), CHUNKS=1)
    new = dict(base, **sa.merge_plan(ns, dv))
    print(dv, ns, "one tile", old["BLOCK_S"], res(compile_(sa._sparse_attn_merge_kernel, old, 4)))
    print(dv, ns, "plan", new["BLOCK_S"], new["CHUNKS"], res(compile_(sa._sparse_attn_merge_kernel, new, 4)), flush=True)
print("---")
for dv, ns in ((512, 68), (512, 100), (128, 100)):
    base = dict(m_ptr="fp32", l_ptr="fp32", acc_ptr="fp32", out_ptr="bf16", stride_ob=dv * 16, stride_oh=dv, stride_od=1,
                HQ=16, DV=dv, BLOCK_DV=triton.next_power_of_2(dv), NUM_SPLITS=ns, PDL=0)
    for bs, ch in ((triton.next_power_of_2(ns), 1), (32, triton.cdiv(ns, 32)), (64, triton.cdiv(ns, 64))):
        print(dv, ns, bs, ch, res(compile_(sa._sparse_attn_merge_kernel, dict(base, BLOCK_S=bs, CHUNKS=ch), 4)), flush=True)
