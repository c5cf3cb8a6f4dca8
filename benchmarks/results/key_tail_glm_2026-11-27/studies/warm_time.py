"""How long `warm_write_index` takes with a cold Triton cache and with a warm one (GPU, no vLLM; prepared
2026-11-27, not yet run): MLA latent rows in two parts (512 + 64, bf16) and Qwen3-8B's GQA keys (8 x 128), the
layouts vLLM hands the writer. Run twice: `TRITON_CACHE_DIR=$(mktemp -d) python3 warm_time.py` (cold), then
again with the same directory (warm: Triton's disk cache). Writes $OUT/warm_time_<label>.json."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.index_write import IndexWriteWorkspace, warm_write_index
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig


def timed(label, index, key, config, key_tail=None):
    ws = IndexWriteWorkspace(index.block_min.shape[0], index.block_min.shape[1], "cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    warm_write_index(index, key, config, ws, key_tail=key_tail)
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    print(f"{label}: warm_write_index {s:.2f} s", flush=True)
    return s


def main():
    rows = {}
    mla = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    index = ref.allocate_index(1024, 64, 1, 576, mla, torch.bfloat16, "cuda")
    proj = torch.randn(16, 576 + 64, device="cuda", dtype=torch.bfloat16)  # k_pe a strided view, as in vLLM
    rows["mla"] = timed("MLA 512 + 64", index, torch.randn(16, 1, 512, device="cuda", dtype=torch.bfloat16), mla,
                        key_tail=proj[:, None, 512:576])
    gqa = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    index = ref.allocate_index(1024, 64, 8, 128, gqa, torch.bfloat16, "cuda")
    qkv = torch.randn(16, (32 + 16) * 128, device="cuda", dtype=torch.bfloat16)
    rows["gqa"] = timed("GQA 8 x 128", index, qkv[:, 32 * 128:40 * 128].view(16, 8, 128), gqa)
    rows["device"] = torch.cuda.get_device_name()
    label = sys.argv[1] if len(sys.argv) > 1 else "run"
    with open(os.path.join(os.environ.get("OUT", "."), f"warm_time_{label}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
