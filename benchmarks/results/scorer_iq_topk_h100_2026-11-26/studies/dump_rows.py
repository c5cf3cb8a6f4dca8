"""Dump the token-score rows (B=8, Hkv=8, 8192 candidates) of the benchmark's cases for offline study."""
import math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D, B = 32, 8, 128, 8
rows = {}
for L in (65536, 131072):
    for budget in (2048,):
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget)
        for seed in range(4):
            s = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=B * 7 + L + seed)
            ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, s[3].shape[1], bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
            sd.sparse_decode_triton(*s, config, 1 / math.sqrt(D), workspace=ws)
            rows[f"{L}_{budget}_{seed}"] = ws.token_scores.view(B * Hkv, -1).cpu().clone()
            del s, ws
        torch.cuda.empty_cache()
torch.save(rows, f"{OUT}/token_rows.pt")
