"""Does PDL still pay when the operator sits between other kernels, as in a model's decode graph?
Each of 4 layers is the operator followed by an o_proj-like GEMM on its output and an in-place
elementwise op on the next layer's query (as rope writes it), all in one CUDA graph. PDL off / on
(trigger at the end) / on with the step's first kernels launched without the PDL attribute.
B=8, 64K, budget 2048, Qwen3-8B shapes; per layer (the GEMM and the elementwise op included)."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels import sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
res = []
orig_block_scores, orig_iq = sd.block_scores_triton, sd.index_query_triton


def no_pdl(f):
    def g(*a, **k):
        with sa.pdl_scope(False):
            return f(*a, **k)
    return g


def set_mode(mode):
    sd.PDL_STANDARD_STEP = sd.PDL_PIPELINED_STEP = mode != "off"
    sa.PDL_TRIGGER = "end"
    entry_off = mode == "end_entry_off"
    sd.block_scores_triton = no_pdl(orig_block_scores) if entry_off else orig_block_scores
    sd.index_query_triton = no_pdl(orig_iq) if entry_off else orig_iq


W = torch.randn(Hq * D, Hq * D, device="cuda", dtype=torch.bfloat16) * 0.01
for L in (65536,):
    budget = 2048
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget, lagged_selection=True)
    std_cfg = config.with_(lagged_selection=False)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=B * 7 + L + i) for i in range(LAYERS)]
    scale = 1 / math.sqrt(D)
    nb = stack[0][3].shape[1]
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, nb, bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
    ws_std = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, nb, bsd.CACHE_BLOCK, std_cfg, torch.bfloat16, "cuda")
    set_mode("off")
    prevs = [sd.sparse_decode_triton(*s, config, scale)[2].clone() for s in stack]
    proj = torch.empty(B, Hq * D, device="cuda", dtype=torch.bfloat16)
    for step in ("standard", "lagged"):
        for foreign in ("none", "gemm+rope"):
            for mode in ("off", "end", "end_entry_off", "off", "end", "end_entry_off"):
                set_mode(mode)

                def fn(i, step=step, foreign=foreign):
                    s = stack[i]
                    if step == "standard":
                        o = sd.sparse_decode_triton(*s, std_cfg, scale, workspace=ws_std)
                    else:
                        o = sd.sparse_decode_triton(*s, config, scale, previous_block_ids=prevs[i], workspace=ws)
                    if foreign != "none":
                        torch.matmul(o[0].view(B, Hq * D), W, out=proj)
                        stack[(i + 1) % LAYERS][0].mul_(1.0)  # the next layer's query, written in place
                    return o

                per_layer = bsd.stacked_time_ms([(lambda i=i: fn(i)) for i in range(LAYERS)]) * 1e3
                row = dict(L=L, step=step, foreign=foreign, pdl=mode, per_layer_us=round(per_layer, 2))
                res.append(row)
                print(row, flush=True)
set_mode("off")
json.dump(res, open(os.path.join(OUT, "pdl_foreign_study.json"), "w"), indent=1)
