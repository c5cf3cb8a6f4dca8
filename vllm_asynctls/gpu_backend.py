"""AsyncTLS attention backend for vLLM on CUDA GPUs: vLLM's FlashAttention for everything dense, the
Triton sparse decode operator for decode steps, decode captured in full CUDA graphs.

Design
- Subclasses of vLLM's FLASH_ATTN backend, metadata builder and impl. Prefill, chunked prefill and
  mixed prefill/decode batches are built and run by FlashAttention unchanged (and run eagerly between
  vLLM's piecewise CUDA graphs).
- The builder asks vLLM to put one-token queries first in every batch (`reorder_batch_threshold = 1`,
  vLLM's own batch reordering). A decode-only batch (`max_query_len == 1`, a host integer) gets
  `AsyncTLSDecodeMetadata`: the block table and sequence lengths vLLM already keeps on the device, and
  a `SparseDecodeWorkspace` (every intermediate buffer, carved once per batch size from one arena by
  the builder, outside any capture). A mixed batch gets `AsyncTLSMixedMetadata`: the same for its
  leading one-token queries, and FlashAttention metadata for the rest (a suffix of the batch). The impl runs `asynctls_tip_kernels.sparse_decode.sparse_decode_triton`
  on vLLM's paged cache views (no copy): fixed shapes, no host synchronisation, so the builder
  declares `UNIFORM_SINGLE_TOKEN_DECODE` CUDA-graph support and vLLM captures decode in full graphs
  (`enforce_eager=False`, the default) with the same kernels eager mode runs.
- dense_threshold on GPU. Which kernels a captured graph runs cannot depend on the context lengths of
  the step that replays it, so every decode-only step takes the sparse operator. It attends to every
  token of a context that fits its selection (`token_budget + sink_tokens + local_tokens`), i.e. it
  is exact there when the coarse level keeps every block such a context touches
  (`num_blocks * selection_block_size >= token_budget + 2 * selection_block_size`, true of the defaults
  and the paper's settings); `dense_threshold` is therefore honoured up to that size (a larger value
  is logged at start-up). Decode tokens inside mixed batches take the same sparse path (eagerly:
  mixed batches run between vLLM's piecewise graphs), so a request's tokens do not depend on what
  else shares its batch.
- The index is written in `do_kv_cache_update` right after vLLM's `reshape_and_cache_flash`, by the
  fused Triton index-write kernel (inside the decode graphs too); see `layer_index.py`.
- Counters: request-level counts come from host integers the builder already has
  (`seq_lens_cpu_upper_bound`); the per-token read count of the CPU path is not kept on GPU, because
  a captured graph cannot update host-side tallies. vLLM's warm-up and capture steps are counted too:
  call `reset_counters` (through `collective_rpc`) after start-up before measuring.

MLA models on GPU are served by `gpu_mla_backend.AsyncTLSTritonMLABackend` (the CUDA selector routes
them there). fp8 KV caches (`--kv-cache-dtype fp8`, per-tensor scales) are read by the sparse decode
(`fp8_kv.py`). Not supported (start-up errors naming the feature): sliding-window layers, ALiBi,
soft-capping, learned sinks, other quantised KV caches and per-head scales, KV-sharing layers, KV
connectors (they would load blocks past the index write), speculative decoding, batch-invariant mode,
decode context parallelism, modes other than "asynctls"; cascade attention is never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_asynctls._vllm_compat import (
    FP8_KV_CACHE_DTYPES, UNQUANTISED_KV_CACHE_DTYPES, AsyncTLSBackendTraits, AsyncTLSGPUBackendTraits,
    check_impl_features, rank_kv_heads,
)
from vllm_asynctls.config import AsyncTLSConfig
from vllm_asynctls.decode_workspaces import DecodeAttentionWarmup, DecodeWorkspaces, count_gpu_step, max_decode_batch
from vllm_asynctls.fp8_kv import fp8_decode_inputs
from vllm_asynctls.layer_index import LayerIndex


@dataclass
class AsyncTLSDecodeMetadata:
    """A decode-only step. B = num_reqs (vLLM pads it to the captured batch size; padded rows have
    seq_len 0 and the null block); block_table (B, W) int32; seq_lens (B,) int32 (the new token's K/V
    is written before attention, so they count it)."""

    num_actual_tokens: int
    num_reqs: int
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    workspace: SparseDecodeWorkspace


@dataclass
class AsyncTLSMixedMetadata:
    """A batch with prefill tokens: its first `decode.num_reqs` requests (one query token each, first
    thanks to vLLM's reordering) decode sparse; the rest is FlashAttention's `dense`, whose token rows
    start at `decode.num_actual_tokens`."""

    num_actual_tokens: int
    decode: AsyncTLSDecodeMetadata
    dense: FlashAttentionMetadata


def _prefill_suffix(cm: CommonAttentionMetadata, num_decodes: int, num_decode_tokens: int) -> CommonAttentionMetadata:
    """The batch without its first `num_decodes` requests (views and small eager ops, no host sync)."""

    def rows(x):
        return None if x is None else x[num_decodes:]

    return cm.replace(
        query_start_loc=cm.query_start_loc[num_decodes:] - num_decode_tokens,
        query_start_loc_cpu=cm.query_start_loc_cpu[num_decodes:] - num_decode_tokens,
        seq_lens=cm.seq_lens[num_decodes:],
        num_reqs=cm.num_reqs - num_decodes,
        num_actual_tokens=cm.num_actual_tokens - num_decode_tokens,
        block_table_tensor=cm.block_table_tensor[num_decodes:],
        slot_mapping=cm.slot_mapping[num_decode_tokens:],
        positions=None if cm.positions is None else cm.positions[num_decode_tokens:],
        is_prefilling=rows(cm.is_prefilling),
        seq_lens_cpu_upper_bound=rows(cm.seq_lens_cpu_upper_bound),
        _seq_lens_cpu=rows(cm._seq_lens_cpu),
        _num_computed_tokens_cpu=rows(cm._num_computed_tokens_cpu),
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
        logits_indices_padded=None,
        num_logits_indices=None,
        mm_req_doc_ranges=None,
        rswa_prefix_lens=None,
    )


class AsyncTLSFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention metadata for batches with prefill tokens; `AsyncTLSDecodeMetadata` for decode-only
    batches (built from device tensors vLLM already holds: no host synchronisation)."""

    # FLASH_ATTN's get_cudagraph_support returns this class attribute.
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # one-token queries first: they decode sparse
        self.asynctls = AsyncTLSConfig.from_vllm_config(vllm_config)
        self.sparse_config = self.asynctls.sparse_config(head_dim=self.headdim, is_mla=False)
        self.asynctls.check_cache_block_size(kv_cache_spec.block_size)
        dtype = vllm_config.model_config.dtype
        self.workspaces = DecodeWorkspaces(
            lambda batch, width: (batch, self.num_heads_q, self.num_heads_kv, self.headdim, self.headdim, width,
                                  self.block_size, self.sparse_config, dtype, self.device),
            max_decode_batch(vllm_config), self.device, label="", kv_dtype=kv_cache_spec.dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False):
        cm = common_attn_metadata
        if cm.max_query_len == 1:
            if cm.num_actual_tokens != cm.num_reqs:
                raise RuntimeError(
                    f"asynctls: a decode-only batch must have one token per request; got "
                    f"{cm.num_actual_tokens} tokens for {cm.num_reqs} requests"
                )
            count_gpu_step(cm, cm.num_reqs)
            return self._decode_metadata(cm, cm.num_reqs)
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        count_gpu_step(cm, num_decodes)
        if num_decodes == 0:
            return super().build(common_prefix_len, cm, fast_build)
        dense = super().build(0, _prefill_suffix(cm, num_decodes, num_decode_tokens), fast_build)
        return AsyncTLSMixedMetadata(cm.num_actual_tokens, self._decode_metadata(cm, num_decodes), dense)

    def _decode_metadata(self, cm: CommonAttentionMetadata, num_decodes: int) -> AsyncTLSDecodeMetadata:
        block_table = cm.block_table_tensor  # (B, W) int32, vLLM's persistent device buffer
        return AsyncTLSDecodeMetadata(
            num_actual_tokens=num_decodes,
            num_reqs=num_decodes,
            block_table=block_table[:num_decodes],
            seq_lens=cm.seq_lens[:num_decodes],
            workspace=self.workspaces.get(num_decodes, block_table.shape[1]),
        )

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return False


class AsyncTLSFlashAttentionImpl(FlashAttentionImpl):
    """FlashAttention for batches with prefill tokens; the Triton sparse operator for decode-only ones."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        check_impl_features(alibi_slopes, logits_soft_cap, sinks, sliding_window, attn_type,
                            kv_cache_dtype, kv_sharing_target_layer_name,
                            kv_cache_dtypes=AsyncTLSFlashAttentionBackend.supported_kv_cache_dtypes)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        # fp8 KV cache: vLLM stores K / k_scale and V / v_scale as e4m3 and (FlashAttention 3 taking fp8
        # queries) quantises the query by q_scale before forward; the decode path undoes that for the query
        # and hands the operator the cache's own scales.
        self.kv_fp8 = kv_cache_dtype in FP8_KV_CACHE_DTYPES
        if self.dcp_world_size > 1:
            raise NotImplementedError("--attention-backend asynctls does not support decode context parallelism")
        vllm_config = get_current_vllm_config()
        self.asynctls = AsyncTLSConfig.from_vllm_config(vllm_config)
        self.sparse_config = self.asynctls.sparse_config(head_dim=head_size, is_mla=False)
        calibration = self.asynctls.check_index_calibration(vllm_config, head_size, self.sparse_config.index_channels,
                                                            is_mla=False)
        self.layer_index = LayerIndex(self.sparse_config, num_kv_heads, head_size, is_mla=False, calibration=calibration,
                                      calibration_kv_heads=rank_kv_heads(vllm_config, num_kv_heads) if calibration else None)
        self.warm_attention = DecodeAttentionWarmup(max_decode_batch(vllm_config))

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if kv_cache.numel() == 0:
            return
        num_blocks, _, block_size, _ = kv_cache.shape  # logical (nb, Hkv, bs, 2 * D)
        # The index summarises the keys as written (the model dtype, also under an fp8 cache).
        self.layer_index.ensure(num_blocks, block_size, key.dtype, kv_cache.device)
        self.layer_index.write(key, slot_mapping, layer.layer_name)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if isinstance(attn_metadata, AsyncTLSDecodeMetadata):
            return self._sparse_decode(layer, query, kv_cache, attn_metadata, output)
        if not isinstance(attn_metadata, AsyncTLSMixedMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        md = attn_metadata
        self._sparse_decode(layer, query, kv_cache, md.decode, output)
        n = md.decode.num_actual_tokens
        super().forward(layer, query[n:], key[n:], value[n:], kv_cache, md.dense, output[n:],
                        output_scale, output_block_scale)
        return output

    def _sparse_decode(self, layer, query, kv_cache, md: AsyncTLSDecodeMetadata, output) -> torch.Tensor:
        """Rows [0, md.num_reqs) of `output` from the sparse operator (one query token per request)."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # (nb, bs, Hkv, D)
        B = md.num_reqs
        q, kv_scales = query[:B], None
        if self.kv_fp8:
            q, key_cache, value_cache, kv_scales = fp8_decode_inputs(
                q, key_cache, value_cache, layer._q_scale, layer._k_scale, layer._v_scale, output.dtype)
        self.warm_attention(q, key_cache, value_cache, md.block_table, self.sparse_config, self.scale, kv_scales)
        lix = self.layer_index
        out, _, block_ids = sparse_decode_triton(
            q, key_cache, value_cache, md.block_table, md.seq_lens, lix.index, self.sparse_config,
            self.scale, previous_block_ids=lix.previous_blocks(md.block_table, md.seq_lens), workspace=md.workspace,
            kv_scales=kv_scales,
        )  # (B, Hq, D)
        lix.record_blocks(md.block_table, md.seq_lens, block_ids)
        output[:B].copy_(out.view(output[:B].shape))
        return output


class AsyncTLSFlashAttentionBackend(AsyncTLSGPUBackendTraits, AsyncTLSBackendTraits, FlashAttentionBackend):
    """`--attention-backend asynctls` for GQA / MHA models on CUDA GPUs (vLLM's FLASH_ATTN underneath)."""

    fp8_kv_cache = True  # FLASH_ATTN's own `supports_kv_cache_dtype` decides where fp8 is available (FA3, SM90)
    supported_kv_cache_dtypes = list(UNQUANTISED_KV_CACHE_DTYPES + FP8_KV_CACHE_DTYPES)

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls() -> type[AsyncTLSFlashAttentionImpl]:
        return AsyncTLSFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AsyncTLSFlashAttentionMetadataBuilder]:
        return AsyncTLSFlashAttentionMetadataBuilder

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        reasons = list(super().validate_configuration(*args, **kwargs))
        if kwargs.get("use_mla"):
            reasons.append("MLA layers take vllm_asynctls.gpu_mla_backend.AsyncTLSTritonMLABackend, not this class")
        return reasons
