"""The merge launch's shape: the shipped merge (one program per q head, a 32 x 128 tile, 4 warps) against
programs per (q head, channel chunk) and other warp counts. Deferred pipelined step per layer (4 layers in
one graph), B=8, budget 2048, 64K and 128K; each variant's output compared with the shipped one first."""
import json, math, os, sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")


@triton.jit
def _merge_chunk_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, stride_od,
                        HQ: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, NUM_SPLITS: tl.constexpr,
                        BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        sa._pdl_wait(PDL)
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    offs_dv = pid_d * CH + tl.arange(0, CH)
    dv_mask = offs_dv < DV
    m = tl.load(m_ptr + pid * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + pid * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + (pid * NUM_SPLITS + offs_s[:, None]) * DV + offs_dv[None, :],
                  mask=s_mask[:, None] & dv_mask[None, :], other=0.0)
    sa._pdl_trigger(PDL)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l * w, axis=0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_dv * stride_od, out.to(out_ptr.dtype.element_ty), mask=dv_mask)


class Chunked:
    def __init__(self, ch, warps):
        self.ch, self.warps = ch, warps

    def __getitem__(self, grid):
        def launch(m, l, acc, out, sob, soh, sod, HQ, DV, BLOCK_DV, NUM_SPLITS, BLOCK_S, PDL=0, launch_pdl=False,
                   num_warps=4):
            extra = {"launch_pdl": True} if launch_pdl else {}
            _merge_chunk_kernel[(grid[0], triton.cdiv(DV, self.ch))](
                m, l, acc, out, sob, soh, sod, HQ=HQ, DV=DV, CH=self.ch, NUM_SPLITS=NUM_SPLITS, BLOCK_S=BLOCK_S,
                PDL=PDL, num_warps=self.warps, **extra)
        return launch


Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SCALE = 1 / math.sqrt(D)
real = sa._sparse_attn_merge_kernel
variants = [("shipped", None), ("ch128_w4", Chunked(128, 4)), ("ch128_w8", Chunked(128, 8)), ("ch128_w2", Chunked(128, 2)),
            ("ch64_w2", Chunked(64, 2)), ("ch64_w4", Chunked(64, 4)), ("ch32_w1", Chunked(32, 1)),
            ("ch32_w2", Chunked(32, 2)), ("ch16_w1", Chunked(16, 1)), ("shipped", None)]
res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
    want = sd.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])[0]
    for rep in range(2):
        for name, k in variants:
            sa._sparse_attn_merge_kernel = k or real
            got = sd.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])[0]
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
            ids = [p.clone() for p in prevs]

            def step(i, ws=ws, ids=ids):
                o = sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                            block_ids_out=ids[i], defer_block_join=True)
                if i == LAYERS - 1:
                    ws.join_block_stage()
                return o
            us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
            row = dict(L=L, variant=name, rep=rep, equal_to_shipped=bool(torch.equal(got, want)),
                       deferred_per_layer_us=round(us, 2))
            res.append(row); print(row, flush=True)
    sa._sparse_attn_merge_kernel = real
    del stack, prevs
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "merge_sweep.json"), "w"), indent=1)
