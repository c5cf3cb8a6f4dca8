"""Where the fused merge's time goes (it measured 9 us per layer slower than the merge launch at 64K):
variants of the split kernel made from the shipped source by text replacement, timing only (outputs
wrong where a part is removed). count_only: barrier + counter, no merge; relaxed: the counter's add
without release/acquire (unsafe ordering); two_heads: the last program merges its heads two at a time."""
import json, math, os, sys, importlib.util
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
# The kernel file as measured (the fused merge was not kept in kernels/): loaded beside the package.
_FM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_attention_fused_merge.py")
open("/tmp/_fm.py", "w").write(open(_FM_PATH).read().replace("from .", "from asynctls_tip_kernels."))
_spec = importlib.util.spec_from_file_location("sparse_attention_fused_merge", "/tmp/_fm.py")
fm = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(fm)
sd.sparse_attention_triton, sd.AttentionWorkspace = fm.sparse_attention_triton, fm.AttentionWorkspace
sa = fm
Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SCALE = 1 / math.sqrt(D)
src = open(sa.__file__).read()
LOOP = """            for i in range(tl.minimum(BLOCK_H, GROUP - pid_h * BLOCK_H)):
                h = g * GROUP + pid_h * BLOCK_H + i
                _merge_splits(m_out_ptr, l_out_ptr, acc_out_ptr, (b * HQ + h) * NUM_SPLITS,
                              out_ptr + b * stride_ob + h * stride_oh, stride_od, DV, NUM_SPLITS, BLOCK_S, MERGE_DV)
"""
assert LOOP in src
ADD = 'tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")'
assert ADD in src
variants = {
    "count_only": src.replace(LOOP, "            pass\n"),
    "relaxed": src.replace(ADD, 'tl.atomic_add(counter, 1, sem="relaxed", scope="gpu")'),
    "no_barrier_relaxed_count_only": src.replace(LOOP, "            pass\n").replace(ADD, 'tl.atomic_add(counter, 1, sem="relaxed", scope="gpu")').replace(
        "        tl.debug_barrier()\n        counter =", "        counter ="),
    "tail_unrolled": src.replace("            for i in range(tl.minimum(BLOCK_H, GROUP - pid_h * BLOCK_H)):\n",
                                 "            for i in tl.static_range(GROUP):  # head_blocks == 1 here\n"),
}
kernels = {"launch": None, "fused": sa._sparse_attn_split_kernel}
for name, text in variants.items():
    text = text.replace("from .", "from asynctls_tip_kernels.")
    path = f"/tmp/sa_{name}.py"
    open(path, "w").write(text)
    spec = importlib.util.spec_from_file_location(f"sa_{name}", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    kernels[name] = mod._sparse_attn_split_kernel
real = sa._sparse_attn_split_kernel
res = []
for L in (65536,):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
    for rep in range(2):
        for name, k in kernels.items():
            sa.ATTN_FUSED_MERGE = name != "launch"
            sa._sparse_attn_split_kernel = k or real
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
            ids = [p.clone() for p in prevs]

            def step(i, ws=ws, ids=ids):
                o = sd.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                            block_ids_out=ids[i], defer_block_join=True)
                if i == LAYERS - 1:
                    ws.join_block_stage()
                return o
            us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
            # attention alone on fixed positions, 4 layers in one graph
            pos = ws.positions.clone()
            ua = bsd.stacked_time_ms([(lambda i=i: sa.sparse_attention_triton(stack[i][0], stack[i][1], stack[i][2],
                                                                            stack[i][3], pos, SCALE, workspace=ws.attention))
                                      for i in range(LAYERS)]) * 1e3
            row = dict(L=L, variant=name, rep=rep, deferred_per_layer_us=round(us, 2), attention_alone_us=round(ua, 2))
            res.append(row); print(row, flush=True)
    sa._sparse_attn_split_kernel = real
json.dump(res, open(os.path.join(OUT, "merge_parts.json"), "w"), indent=1)
