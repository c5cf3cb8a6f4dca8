"""How long `warm_decode_attention` takes, and how many variants it launches, for Qwen3-8B's GQA shapes and
GLM-4.7-Flash's latent rows (bf16, budget 2048), batches up to 32 (the throughput runs' engines) and 512 (a
server's default), with the Triton cache as given (run it with a fresh TRITON_CACHE_DIR, then again: cold, then
warm). Writes $OUT/warm_attention_<label>.json."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import warm_decode_attention


def timed(label, query, key_cache, value_cache, config, max_batch):
    block_table = torch.zeros(max_batch, 1024, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    batches = warm_decode_attention(query, key_cache, value_cache, block_table, config, 0.08, max_batch)
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    print(f"{label} up to {max_batch}: {len(batches)} variants {batches}, {s:.2f} s", flush=True)
    return {"seconds": s, "batches": batches}


def main():
    rows = {"device": torch.cuda.get_device_name()}
    gqa = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    cache = torch.zeros(64, 64, 8, 128, dtype=torch.bfloat16, device="cuda")
    q = torch.zeros(512, 32, 128, dtype=torch.bfloat16, device="cuda")
    mla = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    latent = torch.zeros(64, 64, 1, 576, dtype=torch.bfloat16, device="cuda")
    q_mla = torch.zeros(512, 20, 576, dtype=torch.bfloat16, device="cuda")
    for max_batch in (32, 512):
        rows[f"gqa_{max_batch}"] = timed("GQA 32/8 x 128", q, cache, cache, gqa, max_batch)
        rows[f"mla_{max_batch}"] = timed("MLA 20 x 576/512", q_mla, latent, latent[..., :512], mla, max_batch)
    label = sys.argv[1] if len(sys.argv) > 1 else "run"
    with open(os.path.join(os.environ.get("OUT", "."), f"warm_attention_{label}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
