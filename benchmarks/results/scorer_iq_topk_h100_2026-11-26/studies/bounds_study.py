"""Upper bounds, in situ: per-layer time of the deferred pipelined step (4 layers in one graph, B=8,
budget 2048) with one piece removed at a time (outputs wrong where a piece is removed; timing only)."""
import json, math, os, sys, importlib.util
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, block_select as bs
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
real_topk, real_iq = sd.topk_rows, sd.index_query_triton
nosearch_src = open(bs.__file__).read().replace("from .sparse_attention", "from asynctls_tip_kernels.sparse_attention").replace(
    "from .sparse_decode_reference", "from asynctls_tip_kernels.sparse_decode_reference").replace(
    "    searching = n_valid > K\n", "    searching = n_valid < 0\n")
open("/tmp/topk_nosearch2.py", "w").write(nosearch_src)
spec = importlib.util.spec_from_file_location("topk_nosearch2", "/tmp/topk_nosearch2.py")
nosearch = importlib.util.module_from_spec(spec); spec.loader.exec_module(nosearch)


def token_topk_skip(scores, k, out=None, block_map=None, **kw):
    if block_map is not None:
        return out
    return real_topk(scores, k, out=out, block_map=block_map, **kw)


def token_topk_nosearch(scores, k, out=None, block_map=None, **kw):
    if block_map is not None:
        return nosearch.topk_rows(scores, k, out=out, block_map=block_map, **kw)
    return real_topk(scores, k, out=out, block_map=block_map, **kw)


res = []
for L in (65536, 131072):
    base_cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, base_cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    scale = 1 / math.sqrt(D)
    nb = stack[0][3].shape[1]
    prevs = [sd.sparse_decode_triton(*s, base_cfg, scale)[2].clone() for s in stack]
    variants = ["base", "no_iq", "topk_nosearch", "no_token_topk", "sink_local_0", "budget_1920", "base"]
    for v in variants:
        config = base_cfg
        if v == "sink_local_0":
            config = base_cfg.with_(sink_tokens=0, local_tokens=0)
        if v == "budget_1920":
            config = base_cfg.with_(token_budget=1920)
        sd.topk_rows = {"topk_nosearch": token_topk_nosearch, "no_token_topk": token_topk_skip}.get(v, real_topk)
        sd.index_query_triton = (lambda *a, **k: None) if v == "no_iq" else real_iq
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, nb, bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
        ids = [torch.empty_like(prevs[0]) for _ in range(LAYERS)]
        # fill the workspace once with real values (positions, index query) before timing
        sd.topk_rows, keep = real_topk, sd.topk_rows
        sd.index_query_triton, keep_iq = real_iq, sd.index_query_triton
        sd.sparse_decode_triton(*stack[0], config, scale, previous_block_ids=prevs[0], workspace=ws)
        sd.topk_rows, sd.index_query_triton = keep, keep_iq

        def fn(i, config=config, ws=ws, ids=ids):
            o = sd.sparse_decode_triton(*stack[i], config, scale, previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=True)
            if i == LAYERS - 1:
                ws.join_block_stage()
            return o
        per_layer = bsd.stacked_time_ms([(lambda i=i: fn(i)) for i in range(LAYERS)]) * 1e3
        row = dict(L=L, variant=v, per_layer_us=round(per_layer, 2))
        res.append(row); print(row, flush=True)
    sd.topk_rows, sd.index_query_triton = real_topk, real_iq
    del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "bounds_study.json"), "w"), indent=1)
