"""AsyncTLS attention backend for vLLM: vLLM's four parts (backend, metadata, builder, impl) for GQA and MLA.

Design
- Dense stays dense. Prefill tokens, mixed batches' prefill part, and decode tokens whose context is
  at most `dense_threshold` run through the platform's own backend (on CPU: vLLM's CPU_ATTN /
  CPU_MLA impls, which these classes subclass); nothing here re-implements dense attention. A batch
  with no long decode token is handed to the parent impl unchanged, so short-context serving pays
  only one Python branch per layer.
- Long decode tokens (one query token, context > dense_threshold) take the two-level sparse path:
  `asynctls_tip_kernels.sparse_decode_reference.sparse_decode` (the CPU path) reads vLLM's paged
  KV cache through strided views (no copies) and the per-layer `SparseIndex`.
- The index (block min/max summaries + quantised token index) lives beside vLLM's paged KV cache, one
  per layer, indexed by *physical* cache block, and is written where vLLM writes K/V
  (`do_kv_cache_update`). Selection blocks tile cache blocks, so a prefix-cached block carries its
  summaries with it and chunked prefill simply writes the index chunk by chunk.
- Index channels are calibrated once per layer from the keys of the first real (non-dummy) KV write,
  i.e. the first prefill chunk the engine serves (Double Sparsity's offline calibration, done online:
  the channels with the largest mean |k| per kv head). Later requests reuse them.
- Memory: the index is allocated at the first KV write, sized from the KV cache's block count. Per
  token and kv head it costs `(2 * D + 4) / selection_block_size` (int8 summaries and their float32
  scale) + `index_channels * index_bits / 8` + 4 (codes + scale) bytes: for D = 64, float32, 16-token
  blocks, 32 4-bit channels, 28.25 bytes next to 512 bytes of K/V (~5%). With an explicit KV budget
  (`VLLM_CPU_KVCACHE_SPACE`, `--kv-cache-memory-bytes`) `_vllm_compat.reserve_index_memory` shrinks
  the K/V share by that fraction at start-up, so K/V plus index fit the budget; logged at allocation.
- Counters (`vllm_asynctls.counters`): decode tokens served sparse vs dense per step (builder), and
  tokens the sparse path read (impl, accumulated on device).

- KV offload (`offload` knob, GQA/MHA only; design in `vllm_asynctls.offload.connector`): the layers
  report `AsyncTLSOffloadSpec` (`customize_spec`), so the scheduler frees a long decoding request's
  blocks and the device pool holds the hot caches; every KV write also goes to the host pool, the
  index (indexed by host block, since the paged blocks of an offloaded request are gone) and any
  resident hot slot; long decode tokens select on the index and attend through the hot cache.

Not supported (start-up errors or a logged dense fallback, see `_vllm_compat`): sliding-window,
encoder and cross attention layers stay dense; ALiBi, soft-capping, learned sinks and quantised KV
caches raise. Lagged selection (the paper's pipelining, knob `lagged_selection`) carries each request's
block choice between steps in `vllm_asynctls.lagged_state`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from asynctls_tip_kernels import sparse_decode_reference as ref
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonDecodeMetadata,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
)
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from vllm_asynctls._vllm_compat import (
    BACKEND_NAME, AsyncTLSBackendTraits, check_cpu_mla_dense_threshold, check_impl_features, rank_kv_heads,
)
from vllm_asynctls.config import AsyncTLSConfig
from vllm_asynctls.counters import COUNTERS
from vllm_asynctls.layer_index import LayerIndex
from vllm_asynctls.mla_decode import mla_cache_views, mla_layer_index, write_mla_index

logger = logging.getLogger("vllm.asynctls")  # under vLLM's logger: its handler, level and format


def _asynctls_config(vllm_config: VllmConfig | None = None) -> AsyncTLSConfig:
    return AsyncTLSConfig.from_vllm_config(vllm_config or get_current_vllm_config())


# ==============================================================================================
# GQA / MHA: wraps CPU_ATTN
# ==============================================================================================


@dataclass
class SparseDecodeBatch:
    """The decode tokens served sparse in one step.

    token_ids: (Bs,) int64 rows of the batch's query/output; block_table: (Bs, W) int32;
    seq_lens: (Bs,) int32 (includes the token being decoded, whose K/V was written first).
    """

    token_ids: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor


@dataclass
class OffloadTokens:
    """Where this step's new tokens go in the offload's host rows (offload on only).

    token_block0: (N,) int64 first KV block of each token's request (the worker's request key);
    token_pos: (N,) int64 logical position of each token; sparse_block0: (Bs,) int64 the same key for
    the sparse decode tokens. Rows are looked up at forward time (`rows`), after the connector applied
    this step's row table."""

    token_block0: torch.Tensor
    token_pos: torch.Tensor
    sparse_block0: torch.Tensor | None
    _rows: tuple | None = None

    def rows(self, runtime) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token rows (N,), sparse rows (Bs,) or None), computed once per step (layers share it)."""
        if self._rows is None:
            tokens = runtime.rows_of(self.token_block0)
            # Host check (CPU path): a request without a row would silently read another row's data.
            if bool((tokens < 0).any()):
                raise RuntimeError("asynctls offload: a scheduled request has no hot-cache row (the connector "
                                   "metadata did not map its first block)")
            sparse = None if self.sparse_block0 is None else runtime.rows_of(self.sparse_block0)
            self._rows = (tokens, sparse)
        return self._rows


@dataclass
class AsyncTLSMetadata:
    """dense: CPU_ATTN metadata of the tokens served dense (None when none are);
    dense_token_ids: (Nd,) rows of those tokens, None meaning all rows in order (no gather);
    sparse: the long decode tokens, None when none; offload: host-row addressing (offload on)."""

    num_actual_tokens: int
    dense: CPUAttentionMetadata | None
    dense_token_ids: torch.Tensor | None = None
    sparse: SparseDecodeBatch | None = None
    offload: OffloadTokens | None = None


def _split_requests(query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, dense_threshold: int):
    """Which requests decode sparse: one query token and a context above the threshold.
    Returns (query_lens (R,), sparse mask (R,) bool), host tensors."""
    query_lens = query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]
    return query_lens, (query_lens == 1) & (seq_lens_cpu > dense_threshold)


class AsyncTLSMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.asynctls = _asynctls_config(vllm_config)
        self.asynctls.check_cache_block_size(kv_cache_spec.block_size)
        if self.asynctls.offload:
            from vllm_asynctls.offload.connector import check_offload_config

            check_offload_config(vllm_config, self.asynctls)
        if self.isa not in CPU_ATTN_TRANSPOSED_KEY_ISAS:
            raise NotImplementedError(
                f"--attention-backend asynctls reads CPU_ATTN's KV cache layout for ISAs "
                f"{CPU_ATTN_TRANSPOSED_KEY_ISAS}; this machine and dtype select {self.isa!r} "
                f"(e.g. AMX with bfloat16). Serve with --dtype float32 or the default backend"
            )

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> AsyncTLSMetadata:
        cm = common_attn_metadata
        # CPU platform: seq_lens and query_start_loc_cpu are host tensors, reading them costs no sync.
        seq_lens_cpu = cm.seq_lens.cpu()
        qsl_cpu = cm.query_start_loc_cpu
        query_lens, sparse = _split_requests(qsl_cpu, seq_lens_cpu, self.asynctls.dense_threshold)
        decode = query_lens == 1
        COUNTERS.record_step(
            prefill_tokens=int(query_lens[~decode].sum()),
            dense_context_lens=seq_lens_cpu[decode & ~sparse].tolist(),
            sparse_context_lens=seq_lens_cpu[sparse].tolist(),
        )
        offload = self._offload_tokens(cm, query_lens, seq_lens_cpu, sparse) if self.asynctls.offload else None
        if not bool(sparse.any()):
            return AsyncTLSMetadata(cm.num_actual_tokens, super().build(common_prefix_len, cm, fast_build),
                                    offload=offload)

        sparse_reqs = sparse.nonzero().squeeze(1)
        device = cm.query_start_loc.device
        sparse_batch = SparseDecodeBatch(
            token_ids=qsl_cpu[sparse_reqs].long().to(device),
            block_table=cm.block_table_tensor[sparse_reqs.to(cm.block_table_tensor.device)].to(torch.int32),
            seq_lens=cm.seq_lens[sparse_reqs.to(cm.seq_lens.device)].to(torch.int32),
        )
        dense_reqs = (~sparse).nonzero().squeeze(1)
        if dense_reqs.numel() == 0:
            return AsyncTLSMetadata(cm.num_actual_tokens, None, None, sparse_batch, offload)
        sub_cm, token_ids = _subset_requests(cm, dense_reqs, query_lens, seq_lens_cpu)
        dense = super().build(0, sub_cm, fast_build)
        return AsyncTLSMetadata(cm.num_actual_tokens, dense, token_ids.to(device), sparse_batch, offload)

    def _offload_tokens(self, cm: CommonAttentionMetadata, query_lens, seq_lens_cpu, sparse) -> OffloadTokens:
        """Host-row addressing of this step's tokens (host tensors, moved to the cache's device)."""
        n = cm.num_actual_tokens
        _check_prefill_reads_resident_blocks(cm, query_lens, seq_lens_cpu, self.kv_cache_spec.block_size)
        reqs = torch.arange(query_lens.shape[0])
        token_req = torch.repeat_interleave(reqs, query_lens)[:n]  # (N,)
        start = (seq_lens_cpu - query_lens).long()  # (R,) tokens computed before this step
        token_pos = start[token_req] + torch.arange(n) - cm.query_start_loc_cpu[token_req].long()  # (N,)
        device = cm.block_table_tensor.device
        block0 = cm.block_table_tensor[:, 0].long()  # (R,) the worker's request key (never freed)
        token_req = token_req.to(device)
        return OffloadTokens(
            token_block0=block0[token_req],
            token_pos=token_pos.to(device),
            sparse_block0=block0[sparse.nonzero().squeeze(1).to(device)] if bool(sparse.any()) else None,
        )


def _subset_requests(cm: CommonAttentionMetadata, reqs: torch.Tensor, query_lens: torch.Tensor, seq_lens_cpu):
    """CommonAttentionMetadata of requests `reqs` (host int64) only, and their token rows (host int64)."""
    sub_qlens = query_lens[reqs]
    qsl = torch.zeros(reqs.numel() + 1, dtype=cm.query_start_loc_cpu.dtype)
    torch.cumsum(sub_qlens, 0, out=qsl[1:])
    starts = cm.query_start_loc_cpu[reqs]
    # token rows: starts[r] + 0..len[r]-1 for each selected request
    token_ids = torch.repeat_interleave(starts - qsl[:-1], sub_qlens) + torch.arange(int(qsl[-1]))
    token_ids = token_ids.long()
    dev = cm.query_start_loc.device

    def rows(x):
        if x is None or not isinstance(x, torch.Tensor):
            return None if x is None else x[reqs.numpy()]
        return x[reqs.to(x.device)]

    sub = cm.replace(
        query_start_loc=qsl.to(dev),
        query_start_loc_cpu=qsl,
        seq_lens=rows(cm.seq_lens),
        num_reqs=int(reqs.numel()),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=int(sub_qlens.max()),
        max_seq_len=int(seq_lens_cpu[reqs].max()),
        block_table_tensor=rows(cm.block_table_tensor),
        slot_mapping=cm.slot_mapping[token_ids.to(cm.slot_mapping.device)],
        causal=rows(cm.causal) if isinstance(cm.causal, torch.Tensor) else cm.causal,
        positions=None if cm.positions is None else cm.positions[token_ids.to(cm.positions.device)],
        is_prefilling=rows(cm.is_prefilling),
        seq_lens_cpu_upper_bound=rows(cm.seq_lens_cpu_upper_bound),
        req_idx=rows(cm.req_idx),
        encoder_seq_lens=rows(cm.encoder_seq_lens),
        encoder_seq_lens_cpu=rows(cm.encoder_seq_lens_cpu),
        dcp_local_seq_lens=rows(cm.dcp_local_seq_lens),
        dcp_local_seq_lens_cpu_upper_bound=rows(cm.dcp_local_seq_lens_cpu_upper_bound),
        rswa_prefix_lens=rows(cm.rswa_prefix_lens),
        replayssm_decode_base_cpu=rows(cm.replayssm_decode_base_cpu),
        mm_req_doc_ranges=None,
        logits_indices_padded=None,
        num_logits_indices=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
    return sub, token_ids


def _check_prefill_reads_resident_blocks(cm: CommonAttentionMetadata, query_lens, seq_lens_cpu,
                                        block_size: int) -> None:
    """A prefill chunk (dense, CPU_ATTN) reads every earlier block from the paged cache. The offload
    manager frees blocks only once a request has computed its prompt (or, re-admitted after
    preemption, its whole recompute) and decodes sparse; should that invariant ever break, fail
    loudly (block id 0 is vLLM's null block) instead of attending over zeros. Host tensors on CPU."""
    prefill = query_lens > 1
    if not bool(prefill.any()):
        return
    start = (seq_lens_cpu - query_lens)[prefill].view(-1, 1)  # (Rp, 1) tokens before this chunk
    table = cm.block_table_tensor[prefill.nonzero().squeeze(1).to(cm.block_table_tensor.device)].cpu()  # (Rp, W)
    cols = torch.arange(table.shape[1]).view(1, -1)
    read = (cols >= 1) & (cols * block_size < start)  # earlier blocks but the first (never freed)
    if bool(((table == 0) & read).any()):
        raise RuntimeError(
            "asynctls offload: a prefill chunk would read KV blocks already moved to the host pool (the offload "
            "manager freed them before the request's prefill was done); this is a bug, please report it"
        )


# Offload fields of this process's model, recorded by the impl at model construction and read by
# `AsyncTLSAttentionBackend.customize_spec` (a classmethod vLLM calls without a config afterwards).
_OFFLOAD_SPEC_FIELDS: dict | None = None


# CPU_ATTN ISAs whose cache layout the sparse path reads (checked against vLLM 0.32.0's
# cpu_attn_reshape_and_cache): per (block, kv head) the keys are stored transposed, (D, block_size),
# the values plain, (block_size, D). Other ISAs (amx: bf16 VNNI tiles, neon, vsx, ...) pack blocks
# differently and are refused at start-up.
CPU_ATTN_TRANSPOSED_KEY_ISAS = ("vec", "vec16")


def _paged_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's cache (num_blocks, Hkv, block_size, 2 * D) -> key / value views
    (num_blocks, block_size, Hkv, D), the kernels' layout (strided, no copy)."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    kv = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1)  # as CPU_ATTN views it
    key_cache, value_cache = kv.chunk(2, dim=2)  # (nb, Hkv, bs, D) each, as memory regions
    head_dim = key_cache.shape[-1]
    # Keys: each (block, head) region holds K^T, (D, bs).
    key_t = key_cache.view(num_blocks, num_kv_heads, head_dim * block_size)
    key_t = key_t.view(num_blocks, num_kv_heads, head_dim, block_size)  # (nb, Hkv, D, bs)
    return key_t.permute(0, 3, 1, 2), value_cache.transpose(1, 2)


class AsyncTLSAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN for everything dense; the AsyncTLS reference for long decode tokens."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        check_impl_features(alibi_slopes, logits_soft_cap, sinks, sliding_window, attn_type,
                            kv_cache_dtype, kv_sharing_target_layer_name)
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
            logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )
        vllm_config = get_current_vllm_config()
        self.asynctls = _asynctls_config(vllm_config)
        if vllm_config.cache_config is not None:
            self.asynctls.check_cache_block_size(vllm_config.cache_config.block_size)
        self.sparse_config = self.asynctls.sparse_config(head_dim=head_size, is_mla=False)
        calibration = self.asynctls.check_index_calibration(vllm_config, head_size, self.sparse_config.index_channels,
                                                            is_mla=False)
        self.layer_index = LayerIndex(self.sparse_config, num_kv_heads, head_size, is_mla=False, calibration=calibration,
                                      calibration_kv_heads=rank_kv_heads(vllm_config, num_kv_heads) if calibration else None)
        self.offload = self.asynctls.offload
        global _OFFLOAD_SPEC_FIELDS
        _OFFLOAD_SPEC_FIELDS = None
        if self.offload:
            from vllm_asynctls.offload.connector import check_offload_config

            check_offload_config(vllm_config, self.asynctls)
            a = self.asynctls
            _OFFLOAD_SPEC_FIELDS = dict(
                offload_threshold=a.dense_threshold,
                hot_rows=vllm_config.scheduler_config.max_num_seqs,
                hot_blocks=a.offload_hot_blocks,
                max_model_len=vllm_config.model_config.max_model_len,
            )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if kv_cache.numel() == 0:
            return
        if self.offload:
            self._offload_kv_update(layer, key, value, kv_cache)
            return
        num_blocks, _, block_size, _ = kv_cache.shape
        self.layer_index.ensure(num_blocks, block_size, kv_cache.dtype, kv_cache.device)
        self.layer_index.write(key, slot_mapping, layer.layer_name)

    def _offload_kv_update(self, layer, key, value, kv_cache) -> None:
        """Write-through of the step's new tokens (before attention reads them): host pool, resident
        hot slots, and the index at host slots (the index outlives the freed paged blocks)."""
        from vllm.model_executor.layers.attention.attention import get_attention_context

        from vllm_asynctls.offload.connector import get_runtime

        md, *_ = get_attention_context(layer.layer_name)
        runtime = get_runtime()
        if md is None or runtime is None or md.offload is None:  # profiling / warm-up runs
            return
        n = md.num_actual_tokens
        rows, _ = md.offload.rows(runtime)
        positions = md.offload.token_pos
        runtime.write_through(layer.layer_name, rows, positions, key[:n], value[:n])
        host_blocks = runtime.pool.num_blocks
        self.layer_index.ensure(host_blocks, runtime.block_size, kv_cache.dtype, kv_cache.device)
        self.layer_index.write(key[:n], runtime.host_slots(rows, positions), layer.layer_name)

    def _offload_sparse_decode(self, layer, q, md: AsyncTLSMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Selection on the host-indexed index, attention through the hot cache.
        q (Bs, Hq, D) -> (output (Bs, Hq, D), positions (Bs, Hkv, P))."""
        from vllm_asynctls.offload.connector import get_runtime

        runtime = get_runtime()
        _, rows = md.offload.rows(runtime)
        sp, cfg, index = md.sparse, self.sparse_config, self.layer_index.index
        host_table = runtime.host_block_table(rows)  # (Bs, W): the index is addressed by host block
        if cfg.mode == "block_only":
            positions = ref.block_only_positions(q, index, host_table, sp.seq_lens, cfg, softmax_scale=self.scale)
        else:  # "asynctls" (the config refuses other modes with offload)
            block_ids = ref.select_blocks(q, index, host_table, sp.seq_lens, cfg, softmax_scale=self.scale)
            selected = ref.select_tokens(q, index, None, host_table, sp.seq_lens, block_ids, cfg,
                                         softmax_scale=self.scale)
            positions = ref.attended_positions(selected, sp.seq_lens, cfg)
        return runtime.attend(layer.layer_name, q, rows, positions, self.scale), positions

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata: AsyncTLSMetadata | None, output,
        output_scale=None, output_block_scale=None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # warm-up
            return output
        md = attn_metadata
        if md.sparse is None:
            return super().forward(layer, query, key, value, kv_cache, md.dense, output, output_scale, output_block_scale)
        if md.dense is not None:
            ids = md.dense_token_ids  # (Nd,)
            out_dense = output.new_empty((ids.shape[0], *output.shape[1:]))  # (Nd, Hq, Dv)
            super().forward(layer, query[ids], key[ids], value[ids], kv_cache, md.dense, out_dense,
                            output_scale, output_block_scale)
            output[ids] = out_dense
        sp = md.sparse
        q = query[sp.token_ids]  # (Bs, Hq, D)
        if self.offload:
            out, positions = self._offload_sparse_decode(layer, q, md)
        else:
            key_cache, value_cache = _paged_kv_views(kv_cache)  # (nb, bs, Hkv, D)
            lix = self.layer_index
            out, positions, block_ids = ref.sparse_decode(
                q, key_cache, value_cache, sp.block_table, sp.seq_lens, lix.index, self.sparse_config, self.scale,
                previous_block_ids=lix.previous_blocks(sp.block_table, sp.seq_lens),
            )
            lix.record_blocks(sp.block_table, sp.seq_lens, block_ids)
        output[sp.token_ids] = out.to(output.dtype)  # (Bs, Hq, Dv)
        COUNTERS.record_sparse_reads(positions)
        return output


class AsyncTLSAttentionBackend(AsyncTLSBackendTraits, CPUAttentionBackend):
    """`--attention-backend asynctls` for GQA / MHA models on the CPU platform."""

    @classmethod
    def customize_spec(cls, spec):
        """With offload on, the layers' full-attention spec becomes `AsyncTLSOffloadSpec`, whose
        scheduler-side manager frees offloaded blocks and reserves the hot caches."""
        spec = super().customize_spec(spec)
        if _OFFLOAD_SPEC_FIELDS is None:
            return spec
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from vllm_asynctls.offload.spec import AsyncTLSOffloadSpec

        if isinstance(spec, AsyncTLSOffloadSpec):
            return spec
        if type(spec) is not FullAttentionSpec:
            raise NotImplementedError(f"asynctls offload covers full-attention layers only; got {type(spec).__name__}")
        return AsyncTLSOffloadSpec.from_spec(spec, **_OFFLOAD_SPEC_FIELDS)

    @staticmethod
    def get_impl_cls() -> type[AsyncTLSAttentionImpl]:
        return AsyncTLSAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AsyncTLSMetadataBuilder]:
        return AsyncTLSMetadataBuilder


# ==============================================================================================
# MLA: wraps CPU_MLA
# ==============================================================================================


@dataclass
class AsyncTLSMLAMetadata(MLACommonMetadata[MLACommonDecodeMetadata]):
    """MLA metadata plus the split of the decode rows (decodes come first in MLA batches):
    sparse_rows / dense_rows: (n,) int64 decode-row indices; None = all rows on the other path."""

    sparse_rows: torch.Tensor | None = None
    dense_rows: torch.Tensor | None = None
    all_sparse: bool = False

    def __post_init__(self) -> None:
        # MLACommonMetadata accepts latent widths 320 / 512 / 576 only: the sizes its GPU kernels
        # compile for. The sparse decode path takes any width; AsyncTLSMLAImpl checks the dense one.
        pass


class AsyncTLSMLAMetadataBuilder(MLACommonMetadataBuilder[AsyncTLSMLAMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, metadata_cls=None, **kwargs) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, metadata_cls=AsyncTLSMLAMetadata, **kwargs)
        self.asynctls = _asynctls_config(vllm_config)
        self.asynctls.check_cache_block_size(kv_cache_spec.block_size)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        seq_lens_cpu = cm.seq_lens.cpu()
        num_decodes = md.num_decodes or 0
        decode_lens = seq_lens_cpu[:num_decodes]
        sparse = decode_lens > self.asynctls.dense_threshold
        COUNTERS.record_step(
            prefill_tokens=int(md.num_actual_tokens - (md.num_decode_tokens or 0)),
            dense_context_lens=decode_lens[~sparse].tolist(),
            sparse_context_lens=decode_lens[sparse].tolist(),
        )
        if num_decodes and bool(sparse.any()):
            device = cm.seq_lens.device
            md.all_sparse = bool(sparse.all())
            md.sparse_rows = sparse.nonzero().squeeze(1).to(device)
            md.dense_rows = None if md.all_sparse else (~sparse).nonzero().squeeze(1).to(device)
        return md


class AsyncTLSMLAImpl(CPUMLAImpl):
    """CPU_MLA for prefill (and dense decode where its kernel applies); AsyncTLS for long decodes.

    The sparse path sees MLA as one kv head: key = latent + rope (`kv_lora_rank + rope_dim`), query =
    the absorbed query vLLM already builds for decode, value = the latent part of the same cache rows.
    """

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args) -> None:
        if kv_cache_dtype != "auto":
            raise NotImplementedError(
                f"--attention-backend asynctls on CPU: kv_cache_dtype must be 'auto'; got {kv_cache_dtype!r}"
            )
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args)
        vllm_config = get_current_vllm_config()
        self.asynctls = _asynctls_config(vllm_config)
        key_dim = self.kv_lora_rank + self.qk_rope_head_dim
        self.sparse_config, self.layer_index = mla_layer_index(self.asynctls, vllm_config, key_dim)
        check_cpu_mla_dense_threshold(key_dim, self.asynctls.dense_threshold)
        if vllm_config.cache_config is not None:
            self.asynctls.check_cache_block_size(vllm_config.cache_config.block_size)

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
        super().do_kv_cache_update(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)
        write_mla_index(self.layer_index, kv_c_normed, k_pe, kv_cache, slot_mapping)

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata: AsyncTLSMLAMetadata, layer):
        md = attn_metadata
        if md.sparse_rows is None:
            return super().forward_mqa(q, kv_c_and_k_pe_cache, md, layer)
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)  # (B, H, L + P) absorbed query
        decode = md.decode
        L = self.kv_lora_rank
        key_cache, value_cache = mla_cache_views(kv_c_and_k_pe_cache, L)
        rows = md.sparse_rows
        block_table = decode.block_table[rows].to(torch.int32)
        seq_lens = decode.seq_lens[rows].to(torch.int32)
        lix = self.layer_index
        sparse_out, positions, block_ids = ref.sparse_decode(
            q[rows], key_cache, value_cache, block_table, seq_lens, lix.index, self.sparse_config, self.scale,
            previous_block_ids=lix.previous_blocks(block_table, seq_lens),
        )  # (Bs, H, L)
        lix.record_blocks(block_table, seq_lens, block_ids)
        COUNTERS.record_sparse_reads(positions)
        if md.all_sparse:
            return sparse_out, None
        out = q.new_empty((q.shape[0], q.shape[1], L))
        out[rows] = sparse_out
        dense = md.dense_rows
        sub = _replace_decode(md, MLACommonDecodeMetadata(
            block_table=decode.block_table[dense], seq_lens=decode.seq_lens[dense], dcp_tot_seq_lens=None,
        ))
        dense_out, _ = super().forward_mqa(q[dense], kv_c_and_k_pe_cache, sub, layer)
        out[dense] = dense_out
        return out, None


def _replace_decode(md: AsyncTLSMLAMetadata, decode: MLACommonDecodeMetadata) -> AsyncTLSMLAMetadata:
    import copy

    sub = copy.copy(md)
    sub.decode = decode
    return sub


class AsyncTLSMLABackend(CPUMLABackend):
    """`--attention-backend asynctls` for MLA models (DeepSeek-V2/V3 family) on the CPU platform."""

    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any latent width: checked by AsyncTLSMLAImpl against the dense kernel

    @staticmethod
    def get_impl_cls() -> type[AsyncTLSMLAImpl]:
        return AsyncTLSMLAImpl

    @staticmethod
    def get_builder_cls() -> type[AsyncTLSMLAMetadataBuilder]:
        return AsyncTLSMLAMetadataBuilder
