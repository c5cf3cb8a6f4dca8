import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import block_select, token_select, sparse_attention
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton
OUT = os.environ.get("OUT", "/tmp")
orig = sparse_attention.pdl_launch
OFF = set()
def patched(kind):
    def f(t):
        return {"PDL": False} if kind in OFF else orig(t)
    return f
block_select.pdl_launch = lambda t: (patched("topk") if t.dtype == torch.float32 else patched("block_scores"))(t)
token_select.pdl_launch = patched("token")
sparse_attention.pdl_launch = patched("attention")
res = []
Hq, Hkv, D, B = 32, 8, 128, 8
for L in (65536, 131072):
    for lagged in (False, True):
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=lagged)
        q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
        scale = 1 / math.sqrt(D)
        ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], bsd.CACHE_BLOCK, config, q.dtype, "cuda")
        prev = sparse_decode_triton(q, kc, vc, table, seq_lens, index, config.with_(lagged_selection=False), scale)[2].clone() if lagged else None
        for name, off in (("all", set()), ("none", {"topk", "block_scores", "token", "attention"}), ("no_topk", {"topk"}),
                          ("no_after_topk", {"token", "attention"}), ("only_attention", {"topk", "block_scores", "token"}),
                          ("all_again", set())):
            OFF.clear(); OFF.update(off)
            us = bsd.graph_time_ms(lambda: sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, previous_block_ids=prev, workspace=ws)) * 1e3
            row = dict(L=L, lagged=lagged, pdl=name, us=us); res.append(row); print(row, flush=True)
        del q, kc, vc, index; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "pdl_study.json"), "w"), indent=1)
