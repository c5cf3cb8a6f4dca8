"""INVALID as run here: `.baseline_kernels` comes first on sys.path and held a link `asynctls_tip_kernels` -> the base
kernels, so "new" ran the base code too (see rotation_ab_clean.py). (Copied from layout_merge_h100_2026-11-26; used here
with HEAD = bd6e260 as "base": the rotation inside the pipelined token scorer.)
A/B in one process of the query rotation's launch shape (index_basis="pca"): the working tree's kernels (new:
one program per output tile, the head dim in one step) against HEAD's (base, as package asynctls_base_kernels:
one program per row tile looping over output tiles and 64-channel steps). Per layer, 4 layers in one graph,
B=8, budget 2048, 64K and 128K: standard and pipelined with the deferred join; dense SDPA per layer for the
ratio; outputs compared. BASIS=channels times the same kernels without a basis. Setup as in
benchmarks/results/scorer_iq_topk_h100_2026-11-26/studies/ab_study.py (HEAD = 7a6c9e0 as "base")."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".baseline_kernels")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd_new
from asynctls_tip_kernels import token_select as ts_new
if os.environ.get("ROTATE_BLOCK_D"):
    ts_new.SCORER_ROTATE_BLOCK_D = int(os.environ["ROTATE_BLOCK_D"])
import importlib
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
BASES = os.environ.get("BASES", "base").split(",")
base_mods = {b: (importlib.import_module(f"asynctls_{b}_kernels.sparse_decode"),
                 importlib.import_module(f"asynctls_{b}_kernels.sparse_config").SparseAttentionConfig) for b in BASES}
MODES = os.environ.get("MODES", "standard,deferred").split(",")
BASIS = os.environ.get("BASIS", "pca")
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
CTXS = [int(x) for x in os.environ.get("CTXS", "65536,131072").split(",")]
res = []


class TokenOnMain:
    """Streams of a workspace whose token stage runs on the caller's stream (only the block stage forks)."""
    def __init__(self, streams):
        self.block = streams[0]
    def __iter__(self):
        yield self.block
        yield torch.cuda.current_stream()


def per_layer(sd, cfg, stack, prevs, mode, token_on_main=False):
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
    if token_on_main and ws.streams is not None:
        ws.streams = TokenOnMain(ws.streams)
    ids = [torch.empty_like(prevs[0]) for _ in stack]
    steps = []
    for i, s in enumerate(stack):
        def step(i=i, s=s):
            if mode == "standard":
                return sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D), workspace=ws)
            o = sd.sparse_decode_triton(*s, cfg, 1 / math.sqrt(D), previous_block_ids=prevs[i], workspace=ws,
                                        block_ids_out=ids[i], defer_block_join=mode == "deferred")
            if mode == "deferred" and i == len(stack) - 1:
                ws.join_block_stage()
            return o
        steps.append(step)
    first = [t.clone() for t in steps[0]()]
    if mode == "deferred":
        ws.join_block_stage()
    torch.cuda.synchronize()
    return bsd.stacked_time_ms(steps) * 1e3, first


for L in CTXS:
    cfg_new = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True, index_basis=BASIS)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg_new, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd_new.sparse_decode_triton(*s, cfg_new, 1 / math.sqrt(D))[2].clone() for s in stack]
    dense = bsd._dense_per_layer_ms(stack, stack[0][0].view(B, Hq, 1, D), L, 1 / math.sqrt(D)) * 1e3
    print(L, "dense per layer", round(dense, 1), flush=True)
    outs = {}
    for rep in range(2):
        for name, sd, cfg in [("new", sd_new, cfg_new)] + ([("new_main", sd_new, cfg_new)] if os.environ.get("TOKEN_ON_MAIN") else []) + [(b, m, C(selection_block_size=64, num_blocks=128, token_budget=2048, index_basis=BASIS,
                                                                                         lagged_selection=True)) for b, (m, C) in base_mods.items()]:
            for mode in MODES:
                c = cfg.with_(lagged_selection=False) if mode == "standard" else cfg
                us, first = per_layer(sd, c, stack, prevs, mode, token_on_main=name == "new_main")
                if rep == 0:
                    outs[(name, mode)] = first
                row = dict(L=L, rep=rep, kernels=name, mode=mode, per_layer_us=round(us, 2), dense_us=round(dense, 1),
                           speedup=round(dense / us, 2))
                res.append(row); print(row, flush=True)
    for mode, b_name in [(m, b) for m in MODES for b in BASES + (["new_main"] if os.environ.get("TOKEN_ON_MAIN") else [])]:
        a, b = outs[("new", mode)], outs[(b_name, mode)]
        eq = dict(L=L, mode=mode, against=b_name, out_equal=torch.equal(a[0], b[0]), positions_equal=torch.equal(a[1], b[1]),
                  blocks_equal=torch.equal(a[2], b[2]))
        res.append(eq); print(eq, flush=True)
    del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, f"ab_rotate_{BASIS}_{os.environ.get('ROTATE_BLOCK_D', '8')}.json"), "w"), indent=1)
