"""SASS instructions per candidate of the token-score kernel, word path vs dot path, counted offline.

Compiles `_token_score_kernel` for sm_90 with the bundled ptxas (no GPU needed) at the benchmark's
specialisation (Qwen3-8B group of 4 q heads per kv head, 32 channels at 4 bits, block 64, bf16 query,
"lse") and disassembles it with the bundled cuobjdump. Both paths are straight-line code (every loop is
unrolled), so the static count per thread is also the executed count; divided by the candidates a
thread scores, it is the issue cost per candidate.

Usage: python benchmarks/sass_token_score.py
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from asynctls_tip_kernels import token_select
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(kernel, args: dict, num_warps: int, num_stages: int = 1):
    """`triton.compile` with the JIT's specialisation emulated: pointers 16-byte aligned, ints equal to 1
    constant, ints divisible by 16 marked so."""
    sig, consts, attrs = {}, {}, {}
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    for i, name in enumerate(kernel.arg_names):
        v = args[name]
        if name in constexpr_names or v == 1 and isinstance(v, int):
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = "*" + v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                num_stages=num_stages))


def sass_ops(compiled) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    text = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                          check=True).stdout
    os.unlink(f.name)
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", text)


def main() -> dict:
    Hkv, Dk, CBS, S, C, bits = 8, 128, 64, 64, 32, 4
    nbytes = C * bits // 8
    base = dict(q_ptr="bf16", codes_ptr="u8", scales_ptr="fp32", k_ptr="bf16", ch_ptr="i64", bt_ptr="i32",
                seq_lens_ptr="i32", block_ids_ptr="i32", scores_ptr="fp32", iq_ptr="fp32",
                NB=128, SINK=64, LOCAL=64, TEMP=0.0884, stride_qb=32 * Dk, stride_qh=Dk, stride_qd=1,
                stride_sb=Hkv * CBS, stride_st=1, stride_sh=CBS,
                stride_kb=CBS * Hkv * Dk, stride_kt=Hkv * Dk, stride_kh=Dk, stride_kd=1, stride_btb=1024,
                HKV=Hkv, GROUP=4, DK=Dk, C=C, BITS=bits, SBS=S, CBS=CBS, BLOCK_C=16, BLOCK_DK=128,
                IEEE=False, LSE=True, PDL=True, ASM=True, IDS_READY=False, WRITE_IQ=False, IQ_BLOCK_C=32)
    word = dict(base, stride_cb=Hkv * CBS * nbytes // 4, stride_ct=nbytes // 4, stride_ch=CBS * nbytes // 4,
                stride_cc=1, BLOCK_H=token_select.word_score_heads(SparseAttentionConfig(), 4),
                BLOCK_T=32 * token_select.WORD_SCORE_WARPS * token_select.WORD_SCORE_SUB, WORDS=True,
                SUB=token_select.WORD_SCORE_SUB, PAIRS=token_select.WORD_SCORE_PAIRS)
    dot = dict(base, stride_cb=Hkv * CBS * nbytes, stride_ct=nbytes, stride_ch=CBS * nbytes, stride_cc=1,
               BLOCK_H=16, BLOCK_T=token_select.TOKEN_SCORE_TILE, WORDS=False, SUB=1, PAIRS=False)
    result = {}
    for name, args, warps in (("word path", word, token_select.WORD_SCORE_WARPS),
                              ("dot path", dot, token_select.TOKEN_SCORE_WARPS)):
        ops = sass_ops(compile_sm90(token_select._token_score_kernel, args, warps))
        per_thread = args["BLOCK_T"] / (32 * warps)
        top = collections.Counter(o.split(".")[0] for o in ops).most_common(8)
        result[name] = len(ops) / per_thread
        print(f"{name:9s}: {len(ops)} SASS instructions per thread, {per_thread:.0f} candidate(s) per thread -> "
              f"{len(ops) / per_thread:.0f} per candidate; most common: " + ", ".join(f"{k} {v}" for k, v in top))
    print(f"dot / word: {result['dot path'] / result['word path']:.2f}x")
    return result


if __name__ == "__main__":
    main()
