"""KV cache layout and the attention merge, in situ: per-layer time of the deferred pipelined step and of the
standard step (4 layers in one graph, B=8, budget 2048) with the paged cache in vLLM's default NHD layout
(blocks, block_size, Hkv, D) and in the HND layout (blocks, Hkv, block_size, D) that vLLM's FlashAttention
backend also supports (VLLM_KV_CACHE_LAYOUT=HND): the same values, strided views, so the kernels are
unchanged. Also the deferred step without its merge launch (an upper bound for fusing the merge into the
split kernel; output wrong, timing only). Outputs of the two layouts are compared first."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SCALE = 1 / math.sqrt(D)
real_merge = sa._sparse_attn_merge_kernel


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def hnd(t):
    """Same values, HND memory order, presented as the kernels' (blocks, block_size, Hkv, D) view."""
    return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


res = []
for L, cbs in ((65536, 64), (131072, 64)):  # cache blocks must hold whole selection blocks of 64
    bsd.CACHE_BLOCK = cbs
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    std_cfg = cfg.with_(lagged_selection=False)
    nhd = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    qd = nhd[0][0].view(B, Hq, 1, D)
    dense_us = bsd._dense_per_layer_ms(nhd, qd, L, SCALE) * 1e3
    stacks = {"NHD": nhd, "HND": [(q, hnd(kc), hnd(vc), t, s, ix) for q, kc, vc, t, s, ix in nhd]}
    prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in nhd]
    # the layouts must give the same step
    o1, p1, b1 = sd.sparse_decode_triton(*stacks["NHD"][0], std_cfg, SCALE)
    o2, p2, b2 = sd.sparse_decode_triton(*stacks["HND"][0], std_cfg, SCALE)
    check = dict(L=L, cbs=cbs, positions_equal=bool(torch.equal(p1, p2)), blocks_equal=bool(torch.equal(b1, b2)),
                 out_max_abs_diff=float((o1.float() - o2.float()).abs().max()),
                 hnd_stride=list(stacks["HND"][0][1].stride()))
    res.append(check); print(check, flush=True)
    for rep in range(2):
        for layout in ("NHD", "HND"):
            stack = stacks[layout]
            for v in ("deferred", "deferred_no_merge", "standard"):
                sa._sparse_attn_merge_kernel = _NoLaunch() if v == "deferred_no_merge" else real_merge
                c = std_cfg if v == "standard" else cfg
                ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], cbs, c, torch.bfloat16, "cuda")
                ids = [p.clone() for p in prevs]

                def step(i, c=c, ws=ws, ids=ids, stack=stack, v=v):
                    if v == "standard":
                        return sd.sparse_decode_triton(*stack[i], c, SCALE, workspace=ws)
                    o = sd.sparse_decode_triton(*stack[i], c, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                                block_ids_out=ids[i], defer_block_join=True)
                    if i == LAYERS - 1:
                        ws.join_block_stage()
                    return o
                us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
                sa._sparse_attn_merge_kernel = real_merge
                row = dict(L=L, cbs=cbs, layout=layout, variant=v, rep=rep, per_layer_us=round(us, 2),
                           dense_per_layer_us=round(dense_us, 2), speedup=round(dense_us / us, 2))
                res.append(row); print(row, flush=True)
        # attention alone on the deferred step's positions (4 layers in one graph)
    for layout in ("NHD", "HND", "NHD", "HND"):
        stack = stacks[layout]
        pos = [sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i])[1].clone() for i in range(LAYERS)]
        us = bsd.stacked_time_ms([(lambda i=i: sa.sparse_attention_triton(stack[i][0], stack[i][1], stack[i][2],
                                                                        stack[i][3], pos[i], SCALE))
                                  for i in range(LAYERS)]) * 1e3
        row = dict(L=L, cbs=cbs, layout=layout, variant="attention_alone", per_layer_us=round(us, 2))
        res.append(row); print(row, flush=True)
    del stacks, nhd, stack, prevs
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "layout_study.json"), "w"), indent=1)
