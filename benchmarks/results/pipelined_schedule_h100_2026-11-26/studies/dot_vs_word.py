"""Token scores: the word path (+ index query; its own launch in the pipelined step) vs the dot path."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import token_select
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
res = []
Hq, Hkv, D, B = 32, 8, 128, 8
LAYERS = 4
for L in (65536, 131072):
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=B * 7 + L + i) for i in range(LAYERS)]
    scale = 1 / math.sqrt(D)
    for lagged in (False, True):
        cfg = config.with_(lagged_selection=lagged)
        prevs = [sd.sparse_decode_triton(*s, config, scale)[2].clone() if lagged else None for s in stack]
        want = None
        for path in ("word", "dot", "word"):
            token_select.WORD_SCORE_MAX_QUERY = 256 if path == "word" else 0
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
            got = [t.clone() for t in sd.sparse_decode_triton(*stack[0], cfg, scale, previous_block_ids=prevs[0])]
            want = want or got
            same_pos = float((got[1] == want[1]).float().mean())
            fns = [(lambda i=i: sd.sparse_decode_triton(*stack[i], cfg, scale, previous_block_ids=prevs[i], workspace=ws))
                   for i in range(LAYERS)]
            own = bsd.graph_time_ms(fns[0]) * 1e3
            per = bsd.stacked_time_ms(fns) * 1e3
            row = dict(L=L, lagged=lagged, path=path, own_us=own, per_layer_us=per, positions_equal=same_pos)
            res.append(row); print(row, flush=True)
            del ws
    del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "dot_vs_word.json"), "w"), indent=1)
