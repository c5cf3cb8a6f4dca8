"""The long-split plan's own knobs: rows per tile (ATTN_BLOCK_N), programs per SM and stages, around the
shipped 32 / 3 / 3. Deferred pipelined step per layer at B=8 (64K and 128K, 4 layers in one graph) and the
standard step at B=32, 64K (one layer's data, 4 calls in one graph); outputs compared with the shipped plan's."""
import itertools, json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, 128
SCALE = 1 / math.sqrt(D)
SHIPPED = (sa.ATTN_BLOCK_N, sa.ATTN_LONG_SPLIT_PROGRAMS_PER_SM, sa.ATTN_LONG_SPLIT_STAGES)
GRID = [SHIPPED] + [c for c in itertools.product((16, 32, 64), (3, 4), (3, 4)) if c != SHIPPED] + [SHIPPED]
res = []


def use(c):
    sa.ATTN_BLOCK_N, sa.ATTN_LONG_SPLIT_PROGRAMS_PER_SM, sa.ATTN_LONG_SPLIT_STAGES = c


for B, L, layers, mode in ((8, 65536, 4, "deferred"), (8, 131072, 4, "deferred"), (32, 65536, 1, "standard")):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(layers)]
    prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
    c_mode = cfg.with_(lagged_selection=False) if mode == "standard" else cfg
    use(SHIPPED)
    want = sd.sparse_decode_triton(*stack[0], c_mode, SCALE, previous_block_ids=prevs[0] if mode != "standard" else None)[0]
    for c in GRID:
        use(c)
        try:
            got = sd.sparse_decode_triton(*stack[0], c_mode, SCALE, previous_block_ids=prevs[0] if mode != "standard" else None)[0]
            err = float((got.float() - want.float()).abs().max())
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, c_mode, torch.bfloat16, "cuda")
            ids = [p.clone() for p in prevs]

            def step(i, ws=ws, ids=ids):
                j = i % layers
                if mode == "standard":
                    return sd.sparse_decode_triton(*stack[j], c_mode, SCALE, workspace=ws)
                o = sd.sparse_decode_triton(*stack[j], c_mode, SCALE, previous_block_ids=prevs[j], workspace=ws,
                                            block_ids_out=ids[j], defer_block_join=True)
                if i == 3:
                    ws.join_block_stage()
                return o
            us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(4)]) * 1e3
            row = dict(B=B, L=L, mode=mode, block_n=c[0], per_sm=c[1], stages=c[2],
                       splits=sa.attention_plan(B, Hq, Hkv, cfg.attended_tokens, D, D)["NUM_SPLITS"], max_err=err,
                       per_layer_us=round(us, 2))
        except Exception as e:
            row = dict(B=B, L=L, mode=mode, block_n=c[0], per_sm=c[1], stages=c[2], error=str(e)[:150])
        res.append(row); print(row, flush=True)
    use(SHIPPED)
    del stack, prevs; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "long_split_knobs.json"), "w"), indent=1)
