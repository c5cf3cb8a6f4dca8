"""The long-split attention plan as shipped (`sparse_attention.ATTN_LONG_SPLITS`, with its rule on groups and
tiles per split) against the short splits alone, interleaved in one process: B=8 at 64K and 128K, budgets
2048 / 1024 / 512 (deferred pipelined step and standard step, per layer with 4 layers in one graph); B=4 and
B=32 at 64K and 128K (one layer's data, 4 calls in one graph). Outputs of the two plans compared."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, 128
SCALE = 1 / math.sqrt(D)
res = []


def run(B, L, layers, budgets):
    base = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, base, seed=B * 7 + L + i) for i in range(layers)]
    for budget in budgets:
        cfg = base.with_(token_budget=budget)
        prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
        outs = {}
        for rep in range(2):
            for on in (True, False):
                sa.ATTN_LONG_SPLITS = on
                plan = sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D)
                outs[on] = sd.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])
                for mode in ("deferred", "standard"):
                    c = cfg.with_(lagged_selection=False) if mode == "standard" else cfg
                    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, c, torch.bfloat16, "cuda")
                    ids = [p.clone() for p in prevs]

                    def step(i, c=c, ws=ws, ids=ids, mode=mode):
                        j = i % layers
                        if mode == "standard":
                            return sd.sparse_decode_triton(*stack[j], c, SCALE, workspace=ws)
                        o = sd.sparse_decode_triton(*stack[j], c, SCALE, previous_block_ids=prevs[j], workspace=ws,
                                                    block_ids_out=ids[j], defer_block_join=True)
                        if i == 3:
                            ws.join_block_stage()
                        return o
                    us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(4)]) * 1e3
                    row = dict(B=B, L=L, budget=budget, long_splits=on, splits=plan["NUM_SPLITS"], stages=plan["num_stages"],
                               mode=mode, rep=rep, per_layer_us=round(us, 2))
                    res.append(row); print(row, flush=True)
        eq = dict(B=B, L=L, budget=budget, positions_equal=bool(torch.equal(outs[True][1], outs[False][1])),
                  out_max_abs_diff=float((outs[True][0].float() - outs[False][0].float()).abs().max()))
        res.append(eq); print(eq, flush=True)
    del stack; torch.cuda.empty_cache()


run(8, 65536, 4, (2048, 1024, 512))
run(8, 131072, 4, (2048, 1024, 512))
run(4, 65536, 1, (2048,))
run(32, 65536, 1, (2048, 512))
run(32, 131072, 1, (2048,))
sa.ATTN_LONG_SPLITS = True
json.dump(res, open(os.path.join(OUT, "long_split_ab.json"), "w"), indent=1)
