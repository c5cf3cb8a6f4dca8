"""vLLM's fp8 KV cache (`--kv-cache-dtype fp8`) as the sparse decode operator reads it (no vLLM import
here, so the kernel tests can check it on any machine).

GQA/MHA (FLASH_ATTN's layout): vLLM stores K / k_scale and V / v_scale as float8 e4m3 in a byte tensor,
with per-tensor scales kept on the layer (`_k_scale`, `_v_scale`: one-element float32 device tensors,
calibrated or computed once), and quantises the query by `_q_scale` before the backend sees it
(FlashAttention 3 takes fp8 queries). The decode path views the cache as e4m3, hands the operator the two
scales (read by the kernel: no host synchronisation) and dequantises the query back to the model dtype.

MLA (TRITON_MLA's layout): one latent row per token, stored as row / k_scale (`concat_and_cache_mla`);
the value is a view of the same row, so `_k_scale` is both scales, as TRITON_MLA passes it. The query
stays in the model dtype (TRITON_MLA turns vLLM's query quantisation off).
"""

from __future__ import annotations

import torch


def fp8_decode_inputs(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      q_scale: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, dtype: torch.dtype):
    """(query in `dtype`, key cache, value cache as e4m3 views, kv_scales) for `sparse_decode_triton` from
    vLLM's fp8 cache views (byte or e4m3) and the layer's per-tensor scales (0-d, or (1,) from a
    checkpoint's KV scheme); an fp8 query is dequantised by `q_scale`, one in `dtype` already is passed
    through."""
    if query.dtype == torch.float8_e4m3fn:
        if q_scale.numel() != 1:
            raise ValueError(f"asynctls: the fp8 query's scale must be per tensor (one element); got shape "
                             f"{tuple(q_scale.shape)} (per-head quantisation scales are not supported)")
        query = query.to(dtype) * q_scale.reshape(())  # a 0-d scale keeps `dtype`
    return query, key_cache.view(torch.float8_e4m3fn), value_cache.view(torch.float8_e4m3fn), (k_scale, v_scale)


def fp8_mla_decode_inputs(kv_c_and_k_pe_cache: torch.Tensor, k_scale: torch.Tensor):
    """(latent cache as an e4m3 view, kv_scales) for `sparse_decode_triton` from vLLM's fp8 MLA cache
    (byte or e4m3) and the layer's per-tensor `_k_scale`, which scales both the key row and the value
    (its first kv_lora_rank channels)."""
    return kv_c_and_k_pe_cache.view(torch.float8_e4m3fn), (k_scale, k_scale)
