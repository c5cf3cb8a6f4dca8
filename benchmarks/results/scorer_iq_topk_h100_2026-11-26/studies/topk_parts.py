"""Token top-k, where its time goes: eager CUPTI time per launch of variants (timing only where marked)."""
import json, math, os, sys, importlib.util
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from profile_sparse_decode import kernel_times_us
from asynctls_tip_kernels import sparse_decode as sd, block_select as bs
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B = 32, 8, 128, 8
src = open(bs.__file__).read().replace("from .sparse_attention", "from asynctls_tip_kernels.sparse_attention").replace(
    "from .sparse_decode_reference", "from asynctls_tip_kernels.sparse_decode_reference")
HOIST = [
    ("        offs_g = tl.arange(0, BLOCK_N // SBS)\n        blk = tl.load(map_ptr + row * (N // SBS) + offs_g, mask=offs_g < N // SBS, other=0)\n", ""),
    ("    x = tl.load(scores_ptr + row * N + offs, mask=in_row, other=float(\"-inf\"))\n",
     "    x = tl.load(scores_ptr + row * N + offs, mask=in_row, other=float(\"-inf\"))\n    if MAP_BLOCKS:\n        offs_g = tl.arange(0, BLOCK_N // SBS)\n        blk = tl.load(map_ptr + row * (N // SBS) + offs_g, mask=offs_g < N // SBS, other=0)\n"),
]
NOSCAN = [("    slot = tl.reshape(tl.cumsum(keep_rows, axis=1) + before[:, None], (BLOCK_N,)) - 1\n", "    slot = offs + tl.sum(before) * 0\n")]
NOSEARCH = [("    searching = n_valid > K\n", "    searching = n_valid < 0\n")]
NOSTORE = [("    tl.store(out_row + slot, val.to(tl.int32), mask=keep)\n", "    tl.store(out_row + slot, val.to(tl.int32), mask=keep & (slot < 0))\n")]
NOMAPVAL = [("        val = tl.reshape(blk[:, None] * SBS + tl.arange(0, SBS)[None, :], (BLOCK_N,))\n", "        val = offs + tl.sum(blk) * 0\n")]
variants = {"base": [], "hoist": HOIST, "noscan": NOSCAN, "nosearch": NOSEARCH, "nostore": NOSTORE, "nomapval": NOMAPVAL,
            "nosearch_noscan_nostore": NOSEARCH + NOSCAN + NOSTORE}
mods = {}
for name, edits in variants.items():
    s = src
    for a, b in edits:
        assert a in s, (name, a)
        s = s.replace(a, b)
    path = f"/tmp/topkp_{name}.py"
    open(path, "w").write(s)
    spec = importlib.util.spec_from_file_location(f"topkp_{name}", path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    mods[name] = m
res = {}
for L in (65536,):
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    s = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=L)
    nb = s[3].shape[1]
    ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, nb, bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
    o = sd.sparse_decode_triton(*s, config, 1 / math.sqrt(D), workspace=ws)
    sc = ws.token_scores.view(B * Hkv, -1).clone(); blk = o[2].clone().view(B * Hkv, -1); sl = s[4]
    ref_pos = bs.topk_rows(sc, 2048, block_map=blk, map_block_size=64, seq_lens=sl, sink_tokens=64, local_tokens=64, rows_per_seq=Hkv)
    for rep in range(2):
        for name, m in mods.items():
            out = torch.empty_like(ref_pos)
            fn = lambda m=m, out=out: m.topk_rows(sc, 2048, out=out, block_map=blk, map_block_size=64, seq_lens=sl,
                                                  sink_tokens=64, local_tokens=64, rows_per_seq=Hkv)
            t = kernel_times_us(fn, iters=50)
            fn(); torch.cuda.synchronize()
            us = sum(t.values())
            res[f"{name}_{rep}"] = dict(us=round(us, 2), equal=torch.equal(out, ref_pos))
            print(name, res[f"{name}_{rep}"], flush=True)
json.dump(res, open(os.path.join(OUT, "topk_parts.json"), "w"), indent=1)
