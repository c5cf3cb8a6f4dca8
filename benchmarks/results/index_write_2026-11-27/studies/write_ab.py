"""The decode index write's launch settings (GPU, no vLLM): the one-pass kernel with its heads-per-tile floor
(`index_write.ONE_PASS_MIN_BLOCK_H` 1 or 2: MLA's one latent head padded to two or not) x `ONE_PASS_WARPS`
4 / 8, against the claim kernels, in one run: per layer with 8 layers' writes in one CUDA graph and alone,
MLA (576 channels, B=16, 32K) and Qwen3-8B GQA (8 x 128, B=8, 64K). Each setting's index must equal the
claim kernels' bit for bit. Writes $OUT/write_ab.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from bench_sparse_decode import CACHE_BLOCK, MLA, QWEN3_8B, decode_write_ms, paged_case  # noqa: E402

from asynctls_tip_kernels import index_write  # noqa: E402
from asynctls_tip_kernels.index_write import write_index_triton  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402

FIELDS = ("block_min", "block_max", "block_scale", "codes", "scales")


def written(index, keys, slots, config):
    copy = dataclasses.replace(index, **{n: getattr(index, n).clone() for n in FIELDS if getattr(index, n) is not None})
    write_index_triton(copy, keys, slots, config)
    return [getattr(copy, n) for n in FIELDS if getattr(copy, n) is not None]


def run(kind, B, L):
    if kind == "mla":
        Hkv, Dk, Dv, Hq = 1, MLA["kv_lora_rank"] + MLA["rope_dim"], MLA["kv_lora_rank"], 16
        config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    else:
        Hq, Hkv, Dk = QWEN3_8B["num_q_heads"], QWEN3_8B["num_kv_heads"], QWEN3_8B["head_dim"]
        Dv = Dk
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = paged_case(B, L, Hq, Hkv, Dk, Dv, config, mla=kind == "mla", seed=1)
    pos = seq_lens.long() - 1
    slots = table[torch.arange(B, device="cuda"), pos // CACHE_BLOCK].long() * CACHE_BLOCK + pos % CACHE_BLOCK
    keys = kc.view(-1, *kc.shape[2:])[slots]
    rows = []
    saved = index_write.ONE_PASS_MAX_TOKENS, index_write.ONE_PASS_MIN_BLOCK_H, index_write.ONE_PASS_WARPS
    settings = [("claim kernels", 0, 2, 4)] + [(f"one pass, block_h >= {h}, {w} warps", 256, h, w)
                                                for h in (1, 2) for w in (4, 8)]
    want = None
    for name, max_tokens, min_h, warps in settings:
        index_write.ONE_PASS_MAX_TOKENS, index_write.ONE_PASS_MIN_BLOCK_H, index_write.ONE_PASS_WARPS = (
            max_tokens, min_h, warps)
        try:
            got = written(index, keys, slots, config)
            want = want or got
            equal = all(torch.equal(a, b) for a, b in zip(got, want))
            rows.append(dict(operator=kind, batch=B, context=L, setting=name, equal_to_claim_kernels=equal,
                             per_layer_of_8_us=decode_write_ms(kc, table, seq_lens, index, config, layers=8) * 1e3,
                             alone_us=decode_write_ms(kc, table, seq_lens, index, config) * 1e3))
        finally:
            index_write.ONE_PASS_MAX_TOKENS, index_write.ONE_PASS_MIN_BLOCK_H, index_write.ONE_PASS_WARPS = saved
        r = rows[-1]
        print(f"{kind} B={B}: {name}: {r['per_layer_of_8_us']:.1f} us per layer of 8, {r['alone_us']:.1f} alone, "
              f"equal {equal}", flush=True)
    return rows


def main():
    rows = run("mla", 16, 32768) + run("gqa", 8, 65536) + run("gqa", 32, 65536)
    rows[0]["device"] = torch.cuda.get_device_name()
    with open(os.path.join(os.environ.get("OUT", "."), "write_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
