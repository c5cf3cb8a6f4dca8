"""Programmatic dependent launch: where each kernel lets the next one launch (at its start, as shipped
before, or once its main loop is done) against PDL off, for the standard and the lagged (pipelined)
step; for the lagged step also the token scorer gathering the previous step's block ids and the block
table before its PDL wait ("end+early_gather"). B=8, Qwen3-8B shapes, budget 2048, 64K and 128K; each step from its own CUDA graph and per layer
with 4 layers in one graph. Outputs must equal the PDL-off outputs bit for bit."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels import sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
budgets = [int(x) for x in os.environ.get("BUDGETS", "2048").split(",")]
res = []


def set_mode(step, mode):
    sd.PIPELINED_EARLY_GATHER = mode == "end+early_gather"
    mode = "end" if mode == "end+early_gather" else mode
    on = mode != "off"
    sd.PDL_STANDARD_STEP = on if step == "standard" else False
    sd.PDL_PIPELINED_STEP = on if step == "lagged" else False
    sa.PDL_TRIGGER = "start" if mode == "off" else mode


for L in (65536, 131072):
    for budget in budgets:
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget, lagged_selection=True)
        std_cfg = config.with_(lagged_selection=False)
        stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=B * 7 + L + i) for i in range(LAYERS)]
        scale = 1 / math.sqrt(D)
        nb = stack[0][3].shape[1]
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, nb, bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
        ws_std = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, nb, bsd.CACHE_BLOCK, std_cfg, torch.bfloat16, "cuda")
        set_mode("standard", "off")
        prevs = [sd.sparse_decode_triton(*s, config, scale)[2].clone() for s in stack]
        refs = {}
        for step in ("standard", "lagged"):
            set_mode(step, "off")
            if step == "standard":
                o = sd.sparse_decode_triton(*stack[0], std_cfg, scale, workspace=ws_std)
            else:
                o = sd.sparse_decode_triton(*stack[0], config, scale, previous_block_ids=prevs[0], workspace=ws)
            refs[step] = [t.clone() for t in o]
        for step in ("standard", "lagged"):
            modes = ("off", "start", "end", "off", "end") if step == "standard" else (
                "off", "start", "end", "end+early_gather", "off", "end", "end+early_gather")
            for mode in modes:
                set_mode(step, mode)

                def fn(i, step=step):
                    s = stack[i]
                    if step == "standard":
                        return sd.sparse_decode_triton(*s, std_cfg, scale, workspace=ws_std)
                    return sd.sparse_decode_triton(*s, config, scale, previous_block_ids=prevs[i], workspace=ws)

                o = fn(0)
                torch.cuda.synchronize()
                same = all(torch.equal(a, b) for a, b in zip(o, refs[step]))
                own = bsd.graph_time_ms(lambda: fn(0)) * 1e3
                per_layer = bsd.stacked_time_ms([(lambda i=i: fn(i)) for i in range(LAYERS)]) * 1e3
                row = dict(L=L, budget=budget, step=step, pdl=mode, own_us=round(own, 2),
                           per_layer_us=round(per_layer, 2), equal_to_pdl_off=same)
                res.append(row)
                print(row, flush=True)
        del stack, ws, ws_std
        torch.cuda.empty_cache()
set_mode("standard", "off")
json.dump(res, open(os.path.join(OUT, "pdl_trigger_study.json"), "w"), indent=1)
