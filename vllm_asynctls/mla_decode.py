"""MLA on the sparse path: vLLM's latent cache seen as one kv head (no vLLM import here, so the kernel
tests can check it on any machine).

vLLM's MLA cache holds one row per token, `concat(kv_c_normed, k_pe)` of width `kv_lora_rank +
rope_dim`, and decode runs with the absorbed query over those rows. For the sparse operator the whole
row is the key and its first `kv_lora_rank` channels are the value: a view of the same cache, so each
attended row is read once.
"""

from __future__ import annotations

import torch

from vllm_asynctls.fp8_kv import fp8_mla_decode_inputs


def mla_key_rows(kv_c_normed: torch.Tensor, k_pe: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The latent cache rows vLLM writes for these tokens, as keys of one kv head: (N, 1, L + P)."""
    return torch.cat([kv_c_normed, k_pe.reshape(k_pe.shape[0], -1)], dim=-1).unsqueeze(1).to(dtype)


def mla_layer_index(asynctls, vllm_config, key_dim: int):
    """An MLA layer's (sparse config, `LayerIndex`) from the plugin's `AsyncTLSConfig`: one kv head whose
    key is the whole latent row (`key_dim` = kv_lora_rank + rope_dim). Raises for what MLA lacks."""
    from vllm_asynctls.layer_index import LayerIndex

    if asynctls.offload:
        raise NotImplementedError(
            "asynctls knob offload=true is implemented for GQA/MHA models; this is an MLA model. "
            "Serve it with offload=false"
        )
    sparse_config = asynctls.sparse_config(head_dim=key_dim, is_mla=True)
    asynctls.check_index_calibration(vllm_config, key_dim, sparse_config.index_channels, is_mla=True)
    return sparse_config, LayerIndex(sparse_config, 1, key_dim, is_mla=True)


def mla_cache_views(kv_c_and_k_pe_cache: torch.Tensor, kv_lora_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's latent cache (blocks, block_size, L + P) as one kv head's key cache (blocks, block_size, 1,
    L + P) and value cache (its first L channels): views, no copy."""
    key_cache = kv_c_and_k_pe_cache.unsqueeze(2)
    return key_cache, key_cache[..., :kv_lora_rank]


def write_mla_index(layer_index, kv_c_normed: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Write the index of the rows vLLM just wrote into its latent cache (blocks, block_size, L + P);
    `layer_index` (a `vllm_asynctls.layer_index.LayerIndex`) is allocated at the first real cache. The
    index summarises the rows as computed (the model dtype), also under an fp8 (byte) cache."""
    if kv_cache.numel() == 0:
        return
    layer_index.ensure(kv_cache.shape[0], kv_cache.shape[1], kv_c_normed.dtype, kv_cache.device)
    # The latent and rope parts go to the writer apart: decode steps read both without a joined copy.
    layer_index.write(kv_c_normed.unsqueeze(1), slot_mapping.flatten(),
                      key_tail=k_pe.reshape(k_pe.shape[0], 1, -1).to(kv_c_normed.dtype))


def sparse_mla_decode(q: torch.Tensor, kv_c_and_k_pe_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, kv_lora_rank: int, layer_index, sparse_config, scale: float,
                      workspace=None, k_scale: torch.Tensor | None = None, warm_attention=None) -> torch.Tensor:
    """The Triton sparse operator over vLLM's latent cache for B decode rows: q (B, H, L + P) absorbed
    query, cache (blocks, block_size, L + P), block_table (B, W) int32, seq_lens (B,) int32,
    `layer_index` a `vllm_asynctls.layer_index.LayerIndex`; returns (B, H, L). Fixed shapes and no host
    synchronisation (given a workspace), so it can be captured in a CUDA graph. With a workspace the
    result is the workspace's buffer, overwritten by the next call: consume it first (vLLM's
    `_v_up_proj` does, right after). `k_scale`: the layer's `_k_scale` for an fp8 cache (`--kv-cache-dtype
    fp8`: rows stored as row / k_scale), None for an unquantised one. `warm_attention`: the layer's
    `DecodeAttentionWarmup`, called with the operator's inputs first."""
    from asynctls_tip_kernels.sparse_decode import sparse_decode_triton

    kv_scales = None
    if k_scale is not None:
        kv_c_and_k_pe_cache, kv_scales = fp8_mla_decode_inputs(kv_c_and_k_pe_cache, k_scale)
    key_cache, value_cache = mla_cache_views(kv_c_and_k_pe_cache, kv_lora_rank)
    if warm_attention is not None:
        warm_attention(q, key_cache, value_cache, block_table, sparse_config, scale, kv_scales)
    out, _, block_ids = sparse_decode_triton(
        q, key_cache, value_cache, block_table, seq_lens, layer_index.index, sparse_config, scale,
        previous_block_ids=layer_index.previous_blocks(block_table, seq_lens), workspace=workspace,
        kv_scales=kv_scales,
    )
    layer_index.record_blocks(block_table, seq_lens, block_ids)
    return out
