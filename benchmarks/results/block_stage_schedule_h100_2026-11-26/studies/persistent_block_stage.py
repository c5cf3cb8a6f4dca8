"""The pipelined step's block stage with few, long programs: each block-scorer program loops over
TILES_PER_PROG tiles of 128 selection blocks (64 / 128 / 256 programs at 64K instead of 512 one-tile
programs of 126 registers that fill every SM's register file), so it can run beside the token scorer
(fork at the step's start) without taking its SMs, and spread its summary reads over the token stage instead
of competing with the attention. Variants made from the shipped sources by text replacement (timing
study; outputs compared with the shipped step). Deferred step per layer, 4 layers in one graph, B=8,
budget 2048, 64K and 128K."""
import importlib.util, json, math, os, re, sys, textwrap
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import block_select as bs_real, sparse_decode as sd_real
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")


def load(name, text):
    path = f"/tmp/{name}.py"
    open(path, "w").write(text.replace("from . import", "from asynctls_tip_kernels import").replace("from .", "from asynctls_tip_kernels."))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


src = open(bs_real.__file__).read()
start = src.index("    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)\n")
end_marker = "    tl.store(scores_ptr + pid_bg * N_SEL + offs_j, score, mask=offs_j < N_SEL)\n"
end = src.index(end_marker) + len(end_marker)
body = src[start:end]
early = body[body.index("    if pid_j * (BLOCK_J * SBS) >= L - LOCAL:"):body.index("        return\n") + len("        return\n")]
body = body.replace(early, "")  # full rows in this study: a tile past the row computes -inf scores anyway
loop = ("    for jt in range(TILES_PER_PROG):\n        pid_j = tl.program_id(1) * TILES_PER_PROG + jt\n"
        + textwrap.indent(body, "    "))
psrc = src[:start] + loop + src[end:]
psrc = psrc.replace("    IQ_BLOCK_C: tl.constexpr,\n):", "    IQ_BLOCK_C: tl.constexpr,\n    TILES_PER_PROG: tl.constexpr,\n):", 1)
psrc = psrc.replace("    pid_j = tl.program_id(1)\n", "", 1)
psrc = psrc.replace("    grid = (B * Hkv, triton.cdiv(num_selection_blocks, block_j))",
                    "    grid = (B * Hkv, triton.cdiv(triton.cdiv(num_selection_blocks, block_j), TPP))")
psrc = psrc.replace("        IQ_BLOCK_C=triton.next_power_of_2(iq_c),\n", "        IQ_BLOCK_C=triton.next_power_of_2(iq_c), TILES_PER_PROG=TPP,\n")
assert psrc.count("TILES_PER_PROG=TPP") == 1 and "TPP), " not in psrc
psrc = psrc.replace("from __future__ import annotations\n", "from __future__ import annotations\nTPP = 8\n", 1)
bs_p = load("bs_persistent", psrc)

dsrc = open(sd_real.__file__).read()
sd_after = load("sd_after", dsrc)
sd_fork = load("sd_fork", dsrc.replace("    block_stream.wait_event(ws.token_scores_written)\n", ""))

Hq, Hkv, D, B, LAYERS = 32, 8, 128, 8, 4
SCALE = 1 / math.sqrt(D)
res = []
for L in (65536, 131072):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True)
    stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(LAYERS)]
    prevs = [sd_real.sparse_decode_triton(*s, cfg, SCALE)[2].clone() for s in stack]
    want = sd_real.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])
    variants = [("shipped", sd_real, None, None)]
    for sched, mod in (("after_scores", sd_after), ("fork", sd_fork)):
        variants.append((f"{sched}_one_tile_programs", mod, bs_real.block_scores_triton, None))
        for tpp in (8, 4, 2):
            variants.append((f"{sched}_persistent_{tpp}", mod, bs_p.block_scores_triton, tpp))
    for rep in range(2):
        for name, mod, scorer, tpp in variants:
            if scorer is not None:
                mod.block_scores_triton = scorer
            if tpp is not None:
                bs_p.TPP = tpp
            got = mod.sparse_decode_triton(*stack[0], cfg, SCALE, previous_block_ids=prevs[0])
            equal = all(torch.equal(a, b) for a, b in zip(got, want))
            ws = mod.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg, torch.bfloat16, "cuda")
            ids = [p.clone() for p in prevs]

            def step(i, mod=mod, ws=ws, ids=ids):
                o = mod.sparse_decode_triton(*stack[i], cfg, SCALE, previous_block_ids=prevs[i], workspace=ws,
                                             block_ids_out=ids[i], defer_block_join=True)
                if i == LAYERS - 1:
                    ws.join_block_stage()
                return o
            us = bsd.stacked_time_ms([(lambda i=i: step(i)) for i in range(LAYERS)]) * 1e3
            row = dict(L=L, variant=name, rep=rep, equal_to_shipped=equal, per_layer_us=round(us, 2))
            res.append(row); print(row, flush=True)
    del stack, prevs; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "persistent_block_stage.json"), "w"), indent=1)
