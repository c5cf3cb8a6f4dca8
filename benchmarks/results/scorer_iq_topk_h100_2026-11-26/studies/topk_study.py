"""Token top-k: passes per row, time with / without the search, per-pass cost; token scorer registers."""
import json, math, os, re, sys, importlib.util
import torch, triton
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, block_select as bs, token_select as ts
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B = 32, 8, 128, 8
src = open(bs.__file__).read()
src = src.replace("from .sparse_attention", "from asynctls_tip_kernels.sparse_attention").replace(
    "from .sparse_decode_reference", "from asynctls_tip_kernels.sparse_decode_reference")


def variant(name, edits):
    s = src
    for a, b in edits:
        assert a in s, (name, a)
        s = s.replace(a, b)
    path = f"/tmp/topk_{name}.py"
    open(path, "w").write(s)
    spec = importlib.util.spec_from_file_location(f"topk_{name}", path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m

DBG_SIG = ("    PDL: tl.constexpr,  # programmatic dependent launch (sm90+): wait for the previous kernel here\n):",
           "    PDL: tl.constexpr,  # programmatic dependent launch (sm90+): wait for the previous kernel here\n    dbg_ptr=None,\n):")
DBG_STORE = ("    _pdl_trigger(PDL)\n    # T as an int32 key", "    tl.store(dbg_ptr + row, it)\n    _pdl_trigger(PDL)\n    # T as an int32 key")
mods = {
    "count": variant("count", [DBG_SIG, DBG_STORE]),
    "nosearch": variant("nosearch", [("    searching = n_valid > K\n", "    searching = n_valid < 0\n")]),
    "bisect": variant("bisect", [("INTERP_PASSES=TOPK_INTERP_PASSES", "INTERP_PASSES=0")]),
    "base": variant("base", []),
}
res = {}
for L in (65536, 131072):
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=L + i) for i in range(4)]
    scale = 1 / math.sqrt(D)
    nb = stack[0][3].shape[1]
    rows = []
    for s in stack:
        ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, nb, bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
        o = sd.sparse_decode_triton(*s, config, scale, workspace=ws)
        rows.append((ws.token_scores.view(B * Hkv, -1).clone(), o[2].clone().view(B * Hkv, -1), s[4]))
    torch.cuda.synchronize()
    # passes per row
    m = mods["count"]
    sc, blk, sl = rows[0]
    dbg = torch.zeros(B * Hkv, dtype=torch.int32, device="cuda")
    R, N = sc.shape
    outc = torch.empty(R, 2048 + 128, dtype=torch.int32, device="cuda")
    m._topk_rows_kernel[(R,)](sc, outc, blk, sl, N, K=2048, BLOCK_N=N, MAP_BLOCKS=True, SBS=64, SINK=64, LOCAL=64,
                              HKV=Hkv, BLOCK_P=64, INTERP_PASSES=24, PDL=0, dbg_ptr=dbg, num_warps=8)
    ref_pos = bs.topk_rows(sc, 2048, block_map=blk, map_block_size=64, seq_lens=sl, sink_tokens=64, local_tokens=64, rows_per_seq=Hkv)
    assert torch.equal(ref_pos, outc)
    passes = dbg.tolist()
    entry = {"passes_mean": sum(passes) / len(passes), "passes_max": max(passes), "passes_hist": {p: passes.count(p) for p in sorted(set(passes))}}
    for name in ("base", "nosearch", "bisect"):
        for warps in (4, 8, 16):
            if name != "base" and warps != 8:
                continue
            mm = mods[name]
            mm.TOPK_WARPS_LARGE = warps
            outs = [torch.empty(R, 2176, dtype=torch.int32, device="cuda") for _ in rows]
            fns = [lambda r=r, o=o, mm=mm: mm.topk_rows(r[0], 2048, out=o, block_map=r[1], map_block_size=64, seq_lens=r[2],
                                                       sink_tokens=64, local_tokens=64, rows_per_seq=Hkv) for r, o in zip(rows, outs)]
            t = bsd.stacked_time_ms(fns) * 1e3
            entry[f"{name}_w{warps}_us"] = t
            print(L, name, warps, f"{t:.2f} us", flush=True)
    # token scorer registers
    for k in ts._token_score_kernel.device_caches[0][0].values():
        entry.setdefault("scorer_kernels", []).append({"n_regs": k.n_regs, "n_spills": k.n_spills, "shared": k.metadata.shared})
    for k in bs._topk_rows_kernel.device_caches[0][0].values():
        entry.setdefault("topk_kernels", []).append({"n_regs": k.n_regs, "n_spills": k.n_spills, "num_warps": k.metadata.num_warps})
    res[L] = entry
    print(L, json.dumps(entry), flush=True)
    del stack, rows
    torch.cuda.empty_cache()
json.dump(res, open(f"{OUT}/topk_study.json", "w"), indent=1)
