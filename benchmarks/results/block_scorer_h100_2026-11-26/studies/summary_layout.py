"""Block summaries' memory layout. Shipped: `block_min`, `block_max` (num_cache_blocks, per_block, Hkv, D) int8
and `block_scale` (.., Hkv) float32, three arrays, so one block and kv head is two 128-byte rows 1 KiB apart in
two arrays plus a 4-byte scale in a third (three random accesses). "pair": min and max of a block and kv head
side by side (one 256-byte run: views of one (.., Hkv, 2, D) buffer, equal strides). "packed": min, max and the
scale in one 272-byte run (views of one uint8 buffer). Same values; the kernels take any strides. Block scorer
alone (4 layers' summaries in one graph, none L2-warm) and in situ (standard and deferred steps per layer,
4 layers in one graph), B=8, budget 2048, 64K and 128K; scores and outputs compared with the shipped layout."""
import dataclasses, json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import block_select as bs, sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SCALE = 1 / math.sqrt(D)


def relayout(index, how):
    if how == "separate":
        return index
    nb, pb, h, d = index.block_min.shape
    if how == "pair":
        buf = torch.empty(nb, pb, h, 2, d, dtype=torch.int8, device=index.block_min.device)
        buf[..., 0, :], buf[..., 1, :] = index.block_min, index.block_max
        return dataclasses.replace(index, block_min=buf[..., 0, :], block_max=buf[..., 1, :])
    row = 2 * d + 16
    buf = torch.zeros(nb, pb, h, row, dtype=torch.uint8, device=index.block_min.device)
    bmin, bmax = buf[..., :d].view(torch.int8), buf[..., d:2 * d].view(torch.int8)
    scale = buf[..., 2 * d:2 * d + 4].view(torch.float32)[..., 0]
    bmin.copy_(index.block_min); bmax.copy_(index.block_max); scale.copy_(index.block_scale)
    return dataclasses.replace(index, block_min=bmin, block_max=bmax, block_scale=scale)


res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    lag = cfg.with_(lagged_selection=True)
    base = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    n_sel = base[0][3].shape[1] * bsd.CACHE_BLOCK // 64
    prevs = [sd.sparse_decode_triton(*s, lag, SCALE)[2].clone() for s in base]
    want_scores = bs.block_scores_triton(base[0][0], base[0][5], base[0][3], base[0][4], cfg, n_sel, softmax_scale=SCALE)
    want_step = sd.sparse_decode_triton(*base[0], cfg, SCALE)
    stacks = {how: [s[:5] + (relayout(s[5], how),) for s in base] for how in ("separate", "pair", "packed")}
    for how, stack in stacks.items():
        got_scores = bs.block_scores_triton(stack[0][0], stack[0][5], stack[0][3], stack[0][4], cfg, n_sel, softmax_scale=SCALE)
        got_step = sd.sparse_decode_triton(*stack[0], cfg, SCALE)
        row = dict(L=L, layout=how, scores_equal=bool(torch.equal(got_scores, want_scores)),
                   out_equal=bool(torch.equal(got_step[0], want_step[0])), positions_equal=bool(torch.equal(got_step[1], want_step[1])))
        res.append(row); print(row, flush=True)
    outs = [torch.empty(B, Hkv, n_sel, device="cuda") for _ in range(LAYERS)]
    for rep in range(2):
        for how, stack in stacks.items():
            us = bsd.stacked_time_ms([(lambda i=i, stack=stack: bs.block_scores_triton(
                stack[i][0], stack[i][5], stack[i][3], stack[i][4], cfg, n_sel, out=outs[i], softmax_scale=SCALE))
                for i in range(LAYERS)]) * 1e3
            row = dict(L=L, layout=how, rep=rep, block_scorer_alone_us=round(us, 2)); res.append(row); print(row, flush=True)
            for mode in ("standard", "deferred"):
                conf = cfg if mode == "standard" else lag
                ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, conf, torch.bfloat16, "cuda")
                ids = [p.clone() for p in prevs]

                def step(i, conf=conf, ws=ws, ids=ids, mode=mode, stack=stack):
                    if mode == "standard":
                        return sd.sparse_decode_triton(*stack[i], conf, SCALE, workspace=ws)
                    o = sd.sparse_decode_triton(*stack[i], conf, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                                block_ids_out=ids[i], defer_block_join=True)
                    if i == LAYERS - 1:
                        ws.join_block_stage()
                    return o
                us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
                row = dict(L=L, layout=how, rep=rep, in_situ=mode, per_layer_us=round(us, 2))
                res.append(row); print(row, flush=True)
    del base, stacks, prevs; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "summary_layout.json"), "w"), indent=1)
