"""The MLA attention's wide plan at large batches (GPU, no vLLM): DeepSeek-V2-Lite / GLM-style latent (576 /
512), 32K, budget 2048, blocks of 64 x 128, fp8 cache unless FP8=0. The shipped plan (with BEFORE=1 also the
plan before the many-groups rule: `ATTN_WIDE_MANY_GROUPS_SPLIT_TILES` None), then the wide plan with
no group limit (`ATTN_WIDE_LONG_MAX_GROUPS`) at 1, 2, 3, 4 and 8 tiles of 64 per split
(`ATTN_WIDE_SPLIT_TILES`; with WARPS="4 8" also at 8 warps): the whole operator step from a CUDA graph, the split + merge kernels' eager device
time, and the largest output difference from the shipped plan. Writes $OUT/$NAME.json (default wide_split_sweep).

The first run (`../wide_split_sweep.json`) shipped the long splits past 128 groups; `gpu2.sh` ran the A/B of
the rule it led to."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from bench_sparse_decode import MLA, graph_time_ms, paged_case  # noqa: E402
from profile_sparse_decode import kernel_times_us  # noqa: E402

from asynctls_tip_kernels import sparse_attention as sa  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton  # noqa: E402

CASES = [tuple(int(x) for x in c.split(":")) for c in os.environ.get(
    "CASES", "16:136 16:64 20:64 16:16 16:256").split()]  # heads:batch
TILES = [int(t) for t in os.environ.get("TILES", "1 2 3 4 8").split()]
FP8 = os.environ.get("FP8", "1") == "1"
WARPS = [int(w) for w in os.environ.get("WARPS", "4").split()]  # the wide plan's warps (ATTN_WIDE_NUM_WARPS)
BEFORE = int(os.environ.get("BEFORE", "0"))  # 1: also the plan before 2026-11-27's many-groups rule (long splits)


def run(heads, B):
    Hq, Hkv, Dk, Dv = heads, 1, MLA["kv_lora_rank"] + MLA["rope_dim"], MLA["kv_lora_rank"]
    config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = paged_case(B, 32768, Hq, Hkv, Dk, Dv, config, mla=True, seed=1)
    kv_scales = None
    if FP8:
        s = torch.tensor(0.5, device="cuda")
        kv_scales = (s, s)
        kc = (kc.float() / 0.5).to(torch.float8_e4m3fn)
        vc = kc[..., :Dv]
    scale = 1.0 / math.sqrt(192)
    shapes = (B, Hq, Hkv, config.attended_tokens, Dk, Dv)
    row = dict(device=torch.cuda.get_device_name(), heads=heads, batch=B, context=32768, budget=2048, fp8=FP8,
               plans={})
    saved = (sa.ATTN_WIDE_LONG_MAX_GROUPS, sa.ATTN_WIDE_SPLIT_TILES, sa.ATTN_WIDE_MANY_GROUPS_SPLIT_TILES,
             sa.ATTN_WIDE_NUM_WARPS)
    ref = None
    plans = [("shipped", saved)] + [("before", saved[:2] + (None, saved[3]))] * BEFORE
    for name, consts in plans + [(f"wide_{t}" + (f"_{w}warps" if w != 4 else ""), (1 << 30, t, None, w))
                                 for t in TILES for w in WARPS]:
        (sa.ATTN_WIDE_LONG_MAX_GROUPS, sa.ATTN_WIDE_SPLIT_TILES, sa.ATTN_WIDE_MANY_GROUPS_SPLIT_TILES,
         sa.ATTN_WIDE_NUM_WARPS) = consts
        try:
            plan = sa.attention_plan(*shapes, kv_bytes=kc.element_size())
            row["plans"][name] = {"error": "did not run"}
            ws = SparseDecodeWorkspace(B, Hq, Hkv, Dk, Dv, table.shape[1], kc.shape[1], config, q.dtype, "cuda",
                                       kv_dtype=kc.dtype)

            def step():
                return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=ws,
                                            kv_scales=kv_scales)

            out = step()[0].float().clone()
            ref = out if ref is None else ref
            r = {k: plan[k] for k in ("BLOCK_N", "SPLIT_LEN", "NUM_SPLITS", "num_warps", "num_stages")}
            r["step_us"] = graph_time_ms(step) * 1e3
            r["attention_kernels_us"] = {k: us for k, us in kernel_times_us(step).items() if "_sparse_attn_" in k}
            r["max_abs_diff"] = float((out - ref).abs().max())
            row["plans"][name] = r
            print(f"MLA {heads} heads B={B}{' fp8' if FP8 else ''} {name}: step {r['step_us']:.1f} us, "
                  f"split + merge {sum(r['attention_kernels_us'].values()):.1f} us ({r['NUM_SPLITS']} splits of "
                  f"{r['SPLIT_LEN']}, {r['num_warps']} warps, {r['num_stages']} stages), max diff "
                  f"{r['max_abs_diff']:.2e}", flush=True)
        except Exception as e:  # a plan past shared memory: recorded, the sweep goes on
            row["plans"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"MLA {heads} heads B={B} {name}: {row['plans'][name]['error']}", flush=True)
        finally:
            (sa.ATTN_WIDE_LONG_MAX_GROUPS, sa.ATTN_WIDE_SPLIT_TILES, sa.ATTN_WIDE_MANY_GROUPS_SPLIT_TILES,
             sa.ATTN_WIDE_NUM_WARPS) = saved
    return row


def run_cases(cases, run, name):
    """`run(*case)` for each case; the rows so far go to $OUT/`name`.json after each."""
    rows = []
    for case in cases:
        rows.append(run(*case))
        torch.cuda.empty_cache()
        with open(os.path.join(os.environ.get("OUT", "."), name + ".json"), "w") as f:
            json.dump(rows, f, indent=1)


def main():
    run_cases(CASES, run, os.environ.get("NAME", "wide_split_sweep"))


if __name__ == "__main__":
    main()
