"""AsyncTLS attention backend for MLA models (DeepSeek-V2/V3, GLM style) on CUDA GPUs: vLLM's
TRITON_MLA for prefill, the Triton sparse decode operator for decode, decode captured in full CUDA
graphs.

Design
- Subclasses of vLLM's TRITON_MLA backend, metadata builder and impl. MLA runs prefill through
  `forward_mha` (vLLM's MLA prefill backends, unchanged) and decode through `forward_mqa` with the
  absorbed query (B, H, kv_lora_rank + rope_dim) over the latent cache (blocks, block_size,
  kv_lora_rank + rope_dim). Only `forward_mqa` changes: the sparse operator sees MLA as one kv head
  whose key is the whole latent row and whose value is its first `kv_lora_rank` channels (a view of
  the same cache, so each attended row is read once), the head dims vLLM's `_v_up_proj` expects.
- The builder keeps TRITON_MLA's decode metadata (block table and sequence lengths vLLM already keeps
  on the device) and adds a `SparseDecodeWorkspace`, carved from one arena per engine outside any
  capture, so the decode step has fixed shapes and no host synchronisation; it declares
  `UNIFORM_SINGLE_TOKEN_DECODE`, and vLLM captures decode in full graphs.
- Every decode token takes the sparse operator, as on the GQA GPU path (a captured graph cannot
  branch on the replaying step's context lengths). It attends to every token of a context that fits
  `token_budget + sink_tokens + local_tokens`, so it is exact there.
- The index (summaries and low-bit codes of `index_channels` of the 576 latent channels, default 128)
  is written in `do_kv_cache_update` right after vLLM's `concat_and_cache_mla`, by the fused Triton
  index-write kernel (inside decode graphs too).

fp8 KV caches (`--kv-cache-dtype fp8`, per-tensor scales) are read by the sparse decode as TRITON_MLA
reads them: latent rows stored as row / k_scale, `_k_scale` for key and value (one row), queries in the
model dtype (`fp8_kv.py`); the index is written from the unquantised rows.

Not supported (start-up errors naming the feature): per-head KV scales, sparse-attention models
(DeepSeek V3.2's indexer), decode and prefill context parallelism, KV connectors, speculative decoding,
the offload knob. vLLM's fused MLA RoPE + cache-write pass (`fuse_rope_kvcache_cat_mla`) would skip the
index write, so the plugin turns it off for MLA models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonDecodeMetadata,
    MLACommonMetadata,
    QueryLenSupport,
)
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.mla.triton_mla import TritonMLABackend, TritonMLAImpl, TritonMLAMetadataBuilder

from vllm_asynctls._vllm_compat import (
    FP8_KV_CACHE_DTYPES,
    UNQUANTISED_KV_CACHE_DTYPES,
    AsyncTLSGPUBackendTraits,
    check_impl_features,
)
from vllm_asynctls.config import AsyncTLSConfig
from vllm_asynctls.decode_workspaces import DecodeAttentionWarmup, DecodeWorkspaces, count_gpu_step, max_decode_batch
from vllm_asynctls.mla_decode import mla_layer_index, sparse_mla_decode, write_mla_index

@dataclass
class AsyncTLSMLADecodeMetadata(MLACommonDecodeMetadata):
    """TRITON_MLA's decode metadata (block_table (B, W) int32, seq_lens (B,) int32, B = decode rows,
    padded by vLLM to the captured batch size with seq_len 0) plus the sparse operator's workspace."""

    workspace: SparseDecodeWorkspace | None = None


class AsyncTLSTritonMLAMetadataBuilder(TritonMLAMetadataBuilder):
    """TRITON_MLA's metadata; decode rows also carry the sparse operator's workspace."""

    # Pinned, whatever the parent declares (vLLM 0.32's TRITON_MLA takes multi-token decode rows): the
    # sparse operator takes one query token per decode row.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.SINGLE_ONLY

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        self.asynctls = AsyncTLSConfig.from_vllm_config(vllm_config)
        self.key_dim = self.mla_dims.kv_lora_rank + self.mla_dims.qk_rope_head_dim
        self.sparse_config = self.asynctls.sparse_config(head_dim=self.key_dim, is_mla=True)
        self.asynctls.check_cache_block_size(kv_cache_spec.block_size)
        dtype = vllm_config.model_config.dtype
        self.workspaces = DecodeWorkspaces(
            lambda batch, width: (batch, self.num_heads, 1, self.key_dim, self.mla_dims.kv_lora_rank, width,
                                  kv_cache_spec.block_size, self.sparse_config, dtype, self.device),
            max_decode_batch(vllm_config), self.device, label=" (MLA)", kv_dtype=kv_cache_spec.dtype)

    def _reserve_attn_logits_workspace(self) -> None:
        """TRITON_MLA reserves its split-KV scratch (max_num_seqs x heads x splits x 513 float32, GiBs at
        vLLM's default 1024 sequences) in vLLM's shared workspace; the sparse operator never reads it."""

    def _build_decode(self, block_table_tensor: torch.Tensor, seq_lens_device: torch.Tensor, *args,
                      **kwargs) -> AsyncTLSMLADecodeMetadata:
        base = super()._build_decode(block_table_tensor, seq_lens_device, *args, **kwargs)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return AsyncTLSMLADecodeMetadata(
            **fields, workspace=self.workspaces.get(base.block_table.shape[0], base.block_table.shape[1]))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> MLACommonMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        count_gpu_step(common_attn_metadata, md.num_decodes or 0)
        return md


class AsyncTLSTritonMLAImpl(TritonMLAImpl):
    """TRITON_MLA for prefill; the Triton sparse operator for every decode row."""

    # No log-sum-exp from decode, so vLLM's own check rejects decode context parallelism at start-up;
    # prefill context parallelism has not been run with the sparse path.
    can_return_lse_for_decode: bool = False
    supports_pcp: bool = False

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args) -> None:
        check_impl_features(alibi_slopes, logits_soft_cap, None, sliding_window, attn_type,
                            kv_cache_dtype, kv_sharing_target_layer_name,
                            kv_cache_dtypes=AsyncTLSTritonMLABackend.supported_kv_cache_dtypes)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args)
        # fp8 KV cache: TRITON_MLA's constructor keeps the query in the model dtype (no query quantisation).
        self.kv_fp8 = kv_cache_dtype in FP8_KV_CACHE_DTYPES
        vllm_config = get_current_vllm_config()
        self.asynctls = AsyncTLSConfig.from_vllm_config(vllm_config)
        self.sparse_config, self.layer_index = mla_layer_index(
            self.asynctls, vllm_config, self.kv_lora_rank + self.qk_rope_head_dim)
        self.warm_attention = DecodeAttentionWarmup(max_decode_batch(vllm_config))

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
        super().do_kv_cache_update(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)
        write_mla_index(self.layer_index, kv_c_normed, k_pe, kv_cache, slot_mapping)

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata: MLACommonMetadata, layer):
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)  # (B, H, L + P) absorbed query
        if self.layer_index.index is None:
            raise RuntimeError(
                "asynctls: this MLA layer decodes before its index was written: vLLM wrote the latent cache "
                "without calling the backend's do_kv_cache_update (a compilation pass that fuses the cache "
                "write, e.g. fuse_rope_kvcache_cat_mla?); report this with your compilation config"
            )
        decode = attn_metadata.decode
        out = sparse_mla_decode(q, kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens, self.kv_lora_rank,
                                self.layer_index, self.sparse_config, self.scale, workspace=decode.workspace,
                                k_scale=layer._k_scale if self.kv_fp8 else None, warm_attention=self.warm_attention)
        return out, None


class AsyncTLSTritonMLABackend(AsyncTLSGPUBackendTraits, TritonMLABackend):
    """`--attention-backend asynctls` for MLA models on CUDA GPUs (vLLM's TRITON_MLA underneath)."""

    fp8_kv_cache = True  # TRITON_MLA's own checks decide where fp8 is available (SM89+)
    supported_kv_cache_dtypes = list(UNQUANTISED_KV_CACHE_DTYPES + FP8_KV_CACHE_DTYPES)

    @staticmethod
    def get_impl_cls() -> type[AsyncTLSTritonMLAImpl]:
        return AsyncTLSTritonMLAImpl

    @staticmethod
    def get_builder_cls() -> type[AsyncTLSTritonMLAMetadataBuilder]:
        return AsyncTLSTritonMLAMetadataBuilder
