"""Next GPU session's study (not yet run on a GPU): the MLA token scorer's tile at large batches.

At B=136 (16 heads, fp8, 32K, budget 2048) the token scorer took 132.3 us per layer for about 71 MB of codes
(`../profile_mla/h16_b136_32k_fp8.json`): 0.54 TB/s. Its tile (`token_select.TOKEN_SCORE_TILE` candidates x
`TOKEN_SCORE_WARPS` warps, 128 x 4 for up to 16 heads) was chosen at B=16. This sweeps 128 / 256 / 512
candidates x 4 / 8 warps (and the 17-32-head setting for 20 heads) over the whole operator step from a CUDA
graph, DeepSeek-V2-Lite / GLM latent (576 / 512), fp8 cache, 32K, budget 2048, blocks of 64 x 128, and the
token scorer's eager device time; every setting's output is compared with the shipped one's. Writes
$OUT/mla_token_tile_sweep.json."""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from bench_sparse_decode import MLA, graph_time_ms, paged_case  # noqa: E402
from profile_sparse_decode import kernel_times_us  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wide_split_sweep import run_cases  # noqa: E402

from asynctls_tip_kernels import token_select as ts  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton  # noqa: E402

CASES = [tuple(int(x) for x in c.split(":")) for c in os.environ.get("CASES", "16:16 16:64 16:136 20:64").split()]
SETTINGS = [(128, 4), (128, 8), (256, 4), (256, 8), (512, 8)]  # (candidates, warps)


def run(heads, B):
    Hq, Hkv, Dk, Dv = heads, 1, MLA["kv_lora_rank"] + MLA["rope_dim"], MLA["kv_lora_rank"]
    config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = paged_case(B, 32768, Hq, Hkv, Dk, Dv, config, mla=True, seed=1)
    s = torch.tensor(0.5, device="cuda")
    kc = (kc.float() / 0.5).to(torch.float8_e4m3fn)
    vc = kc[..., :Dv]
    ws = SparseDecodeWorkspace(B, Hq, Hkv, Dk, Dv, table.shape[1], kc.shape[1], config, q.dtype, "cuda",
                               kv_dtype=kc.dtype)

    def step():
        return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, 1.0 / math.sqrt(192), workspace=ws,
                                    kv_scales=(s, s))

    wide = heads > 16  # the 17-32-head constants apply
    names = ("TOKEN_SCORE_TILE_32", "TOKEN_SCORE_WARPS_32") if wide else ("TOKEN_SCORE_TILE", "TOKEN_SCORE_WARPS")
    saved = tuple(getattr(ts, n) for n in names)
    row = dict(device=torch.cuda.get_device_name(), heads=heads, batch=B, shipped=saved, settings={})
    ref = step()[0].float().clone()
    for tile, warps in [saved] + [x for x in SETTINGS if x != saved]:
        setattr(ts, names[0], tile)
        setattr(ts, names[1], warps)
        try:
            out = step()[0].float().clone()
            r = dict(step_us=graph_time_ms(step) * 1e3,
                     token_scorer_us=sum(us for k, us in kernel_times_us(step).items() if "_token_score" in k),
                     max_abs_diff=float((out - ref).abs().max()))
        except Exception as e:  # a setting past the registers or shared memory: recorded
            r = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            setattr(ts, names[0], saved[0])
            setattr(ts, names[1], saved[1])
        row["settings"][f"{tile}x{warps}"] = r
        print(f"MLA {heads} heads B={B} fp8 token tile {tile} x {warps} warps: {r}", flush=True)
    return row


def main():
    run_cases(CASES, run, "mla_token_tile_sweep")


if __name__ == "__main__":
    main()
