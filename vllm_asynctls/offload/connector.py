"""AsyncTLS KV offload inside vLLM 0.32: a KV connector plus a KV cache spec, both vLLM's own machinery.

    LLM(model, attention_backend="asynctls",
        additional_config={"asynctls": {"offload": True, "offload_hot_blocks": 24, ...}},
        kv_transfer_config={"kv_connector": "AsyncTLSOffloadConnector",
                            "kv_connector_module_path": "vllm_asynctls.offload.connector",
                            "kv_role": "kv_both"})

Why this route (what vLLM 0.32 has, and what we reuse)
-----------------------------------------------------
- HiSparse (`vllm/v1/hisparse/`, connector `kv_connector/v1/hisparse/`) is the same idea for DeepSeek
  sparse MLA and the model for this design: a KV connector for the per-step plumbing, and the
  scheduler's own KV cache managers for what the device pool holds (its host "source" group, GPU
  "resident" and per-request "hot" groups). Its data plane cannot be reused: the layout function
  (`get_hisparse_kv_cache_groups`) only takes `MLAAttentionSpec` layers with a DSA indexer, it selects
  token rows of a trained indexer, and its residency resolver and gathers are compiled CUDA ops with
  no CPU path ("host-resident decode has no Python fallback"). We take its structure: a host pool
  written through at every KV write, a device hot cache per request with an LRU resolver of fixed
  shapes (`HotBlockCache`), and the admission rule (the device pool counts the hot cache and the
  resident tail, not the context).
- Native CPU offloading (`--kv-offloading-size`, `OffloadingConnector`, `vllm/v1/kv_offload/`) is a
  prefix-cache tier: full blocks are stored to host and loaded back on a later prefix hit. A running
  request keeps its whole context on the device, so it admits no more long requests. Not reused.
- The scheduler-side lever is vLLM's `KVCacheSpecRegistry` (out-of-tree specs with their own
  `SingleTypeKVCacheManager`) plus the attention backend's `customize_spec` hook, which lets our
  backend report `AsyncTLSOffloadSpec` for its layers. Its manager (spec.py) frees a decoding
  request's blocks past the threshold and reserves the hot caches inside the device pool. That is
  what makes the scheduler admit more long requests; a connector alone cannot change what the
  scheduler counts.
- The connector (this module), loaded out of tree through `kv_connector_module_path`, carries the
  per-step plumbing: on the scheduler side it gives each running request a hot-cache row (freed in
  `request_finished` and on preemption; a re-admitted preempted request keeps all its blocks until
  its recompute is done, `update_state_after_alloc`) and sends `{first block id: row}` plus the rows to reset and
  the hot caches' first block in its metadata; on the worker side `register_kv_caches` builds the
  `OffloadRuntime` (host pool, hot cache, prefetcher) and `bind_connector_metadata` applies the
  step's rows before the forward (vLLM may call `start_load_kv` after the forward, so nothing
  depends on it). The attention impl (backend.py) calls the runtime from vLLM's own hooks:
  `do_kv_cache_update` writes each new token through to the host pool, the layer's index and any
  resident hot slot before attention reads; the sparse decode path resolves the blocks it selected in
  the hot cache (`Prefetcher.acquire`: the previous step's blocks as the prefetch hint, misses copied
  from the host pool) and attends over the hot cache. `wait_for_layer_load` issues the layer's prefetch.
- Requests are keyed on the worker by the physical id of their first KV block (never freed while
  the request lives, and unique because the manager serves no prefix-cache hits), so the attention
  metadata builder needs no request ids: it maps `block_table[:, 0]` through the row table.

The index (block summaries + low-bit token codes) stays on the device for the whole context, as in
the paper: it is indexed by host block (`row * W + logical block`), so selection never touches
offloaded K/V. On CPU "device" and "host" are the same RAM: the copies are real (separate tensors,
counted bytes) but synchronous, so every copy is exposed; the overlap is measured on the GPU by
benchmarks/bench_offload.py (data plane only).

Memory: the device pool (vLLM's KV cache, what the scheduler counts) holds the hot caches
(`max_num_seqs * offload_hot_blocks` blocks, reserved at start-up), the prefilling requests' blocks and
two blocks per offloaded request. The host pool holds `max_num_seqs * ceil(max_model_len / block_size)`
blocks (one static row per hot-cache row), allocated and pinned at start-up, failing with the bytes
asked and available. The index covers the same host blocks and is allocated beside vLLM's pool
(about 7% of the host pool's K/V at the default index settings, head dim 128 bf16), not inside it.

Not covered: MLA layers (the offload path is GQA/MHA only; MLA with offload raises at start-up),
prefix-cache reuse for offloaded requests (see spec.py), speculative decoding,
pipeline/tensor parallelism (one worker), the GPU backend. The runtime here is CPU-only: its write-through
reads slots on the host and `attend` compares tensors with `torch.equal`, both host synchronisations, and
`HotBlockCache.write_through` would need a scratch slot instead of its masked write to be graph-safe.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .host_pool import HostKVPool
from .hot_cache import HotBlockCache, fold_heads, needed_blocks, unfold_output
from .prefetch import Prefetcher
from .spec import AsyncTLSOffloadManager, AsyncTLSOffloadSpec

__all__ = ["AsyncTLSOffloadConnector", "AsyncTLSOffloadMetadata", "OffloadRuntime", "get_runtime",
           "CONNECTOR_NAME", "CONNECTOR_MODULE", "kv_transfer_config", "check_offload_config"]

logger = logging.getLogger("vllm.asynctls")  # under vLLM's logger: its handler, level and format

CONNECTOR_NAME = "AsyncTLSOffloadConnector"
CONNECTOR_MODULE = "vllm_asynctls.offload.connector"


def kv_transfer_config() -> dict[str, str]:
    """The `kv_transfer_config` that loads this connector (for `LLM(...)` / `--kv-transfer-config`)."""
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both"}


def connector_configured(vllm_config) -> bool:
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    return ktc is not None and ktc.kv_connector == CONNECTOR_NAME


def check_offload_config(vllm_config, cfg=None) -> None:
    """Start-up checks of `offload=true` against the engine (a no-op when offload is off): the
    connector is configured, the model is not MLA, and the hot cache holds one step's blocks at this
    cache block size. Raises ValueError / NotImplementedError naming the knob. Called by the backend's
    builder and impl in the worker; `_vllm_compat.validate_vllm_config` can call it too, so a bad
    setting fails in the process that parses the arguments."""
    from vllm_asynctls.config import AsyncTLSConfig

    a = cfg if cfg is not None else AsyncTLSConfig.from_vllm_config(vllm_config)
    if not a.offload:
        return
    if not connector_configured(vllm_config):
        raise ValueError(
            f"asynctls knob offload=true needs the offload KV connector: pass kv_transfer_config="
            f"{kv_transfer_config()} (--kv-transfer-config '{json.dumps(kv_transfer_config())}'); got "
            f"kv_transfer_config={getattr(vllm_config, 'kv_transfer_config', None)!r}"
        )
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None and getattr(model_config, "use_mla", False):
        raise NotImplementedError(
            "asynctls knob offload=true is implemented for GQA/MHA models; this is an MLA model. Serve it with "
            "offload=false"
        )
    cache_config = getattr(vllm_config, "cache_config", None)
    if cache_config is not None and cache_config.block_size:
        a.offload_config().check_against(a.token_budget, a.num_blocks, a.selection_block_size, a.sink_tokens,
                                         a.local_tokens, cache_config.block_size)


@dataclass
class AsyncTLSOffloadMetadata(KVConnectorMetadata):
    """block0_rows: {physical id of a scheduled request's first block: its hot-cache row};
    reset_rows: rows given to a request this step (their hot-cache state is forgotten);
    hot_first_block: first of the contiguous device blocks reserved for the hot caches."""

    block0_rows: dict[int, int] = field(default_factory=dict)
    reset_rows: list[int] = field(default_factory=list)
    hot_first_block: int = -1


# ==============================================================================================
# Worker-side state
# ==============================================================================================

_RUNTIME: "OffloadRuntime | None" = None


def get_runtime() -> "OffloadRuntime | None":
    """This worker process's offload runtime (None until the connector registered the KV caches)."""
    return _RUNTIME


class OffloadRuntime:
    """Host pool, hot cache and prefetcher of one worker, over vLLM's KV cache tensors.

    Geometry: R = max_num_seqs rows, W = ceil(max_model_len / block_size) logical blocks per row.
    The host pool has R * W blocks (row r's logical block j is host block r * W + j, so the host
    slot of position p is `r * W * block_size + p`). The hot cache has R rows of `hot_blocks` slots
    per kv head, stored in the device blocks the scheduler reserved (`bind_hot_storage`).
    """

    def __init__(self, layer_names: list[str], kv_caches: dict[str, Tensor], spec: AsyncTLSOffloadSpec,
                 max_blocks_per_step: int, attended_tokens: int, prefetch_depth: int) -> None:
        first = kv_caches[layer_names[0]]
        self.layer_names = layer_names
        self.layer_of = {name: i for i, name in enumerate(layer_names)}
        self.kv_caches = [kv_caches[n] for n in layer_names]
        self.block_size = spec.block_size
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_size
        self.rows, self.hot_blocks = spec.hot_rows, spec.hot_blocks
        self.max_blocks_per_seq = -(-spec.max_model_len // spec.block_size)
        L, R, W = len(layer_names), self.rows, self.max_blocks_per_seq
        device = first.device
        self.pool = HostKVPool(L, R * W, self.block_size, self.num_kv_heads, self.head_dim, dtype=first.dtype,
                               pin="auto")
        self.cache = HotBlockCache(L, R, self.num_kv_heads, self.hot_blocks, self.block_size, self.head_dim, W,
                                   pinned_blocks=0, max_blocks_per_step=max_blocks_per_step, dtype=first.dtype,
                                   device=device, allocate_storage=False)
        host_table = (torch.arange(R, dtype=torch.int32).view(R, 1) * W
                      + torch.arange(W, dtype=torch.int32).view(1, W))  # (R, W)
        self.prefetcher = Prefetcher(self.cache, self.pool, host_table.to(device), depth=prefetch_depth,
                                     measure_stalls=True)
        self.metrics = self.prefetcher.metrics
        self.row_of_block0 = torch.full((first.shape[0],), -1, dtype=torch.int64, device=device)
        # Previous step's blocks per layer and row: the prefetch hint. (L, R, Hkv, P) int32, -1 padded.
        self.last_need = torch.full((L, R, self.num_kv_heads, attended_tokens), -1, dtype=torch.int32, device=device)
        self.hot_first_block = -1
        self._step = 0
        self._begun = -1
        self._rows: Tensor | None = None
        logger.info(
            "asynctls offload: host pool %.1f MiB (%d rows x %d blocks, pinned=%s), hot caches %.1f MiB "
            "(%d rows x %d blocks per kv head) inside the device KV cache",
            self.pool.nbytes / 2**20, R, W, self.pool.pinned, self.cache.nbytes / 2**20, R, self.hot_blocks,
        )

    # --- per step, from the connector metadata (before the forward) ------------------------------
    def apply(self, md: AsyncTLSOffloadMetadata) -> None:
        if md.hot_first_block >= 0 and md.hot_first_block != self.hot_first_block:
            self.bind_hot_storage(md.hot_first_block)
        if md.block0_rows:
            ids = torch.tensor(list(md.block0_rows), dtype=torch.int64)
            rows = torch.tensor(list(md.block0_rows.values()), dtype=torch.int64)
            self.row_of_block0[ids.to(self.row_of_block0.device)] = rows.to(self.row_of_block0.device)
        if md.reset_rows:
            reset = torch.tensor(md.reset_rows, dtype=torch.int64, device=self.cache.device)
            self.cache.reset_rows(reset)
            self.last_need[:, reset] = -1
        self._step += 1

    def bind_hot_storage(self, first_block: int) -> None:
        """Hot-cache slots = the reserved device blocks [first, first + R * S) of every layer."""
        n = self.rows * self.hot_blocks
        keys, values = [], []
        for name, kv in zip(self.layer_names, self.kv_caches):
            region = kv[first_block:first_block + n]
            if region.shape[0] != n or not region.is_contiguous():
                raise RuntimeError(
                    f"asynctls offload: layer {name}'s KV cache {tuple(kv.shape)} (strides {kv.stride()}) has no "
                    f"contiguous block range [{first_block}, {first_block + n}) for the hot caches")
            flat = region.reshape(-1)
            half = flat.numel() // 2
            keys.append(flat[:half].view(self.cache.slot_shape))
            values.append(flat[half:].view(self.cache.slot_shape))
        self.cache.bind_storage(keys, values)
        self.hot_first_block = first_block

    # --- per layer, from the attention impl -------------------------------------------------------
    def rows_of(self, block0: Tensor) -> Tensor:
        """(B,) first-block ids -> (B,) int64 hot-cache rows."""
        return self.row_of_block0[block0.long()]

    def host_slots(self, rows: Tensor, positions: Tensor) -> Tensor:
        """(N,) rows and logical positions -> (N,) int64 host-pool slots (also the index's slots)."""
        return rows * (self.max_blocks_per_seq * self.block_size) + positions.long()

    def host_block_table(self, rows: Tensor) -> Tensor:
        """(B,) rows -> (B, W) int32 host blocks of each logical block."""
        W = self.max_blocks_per_seq
        return (rows.view(-1, 1) * W + torch.arange(W, device=rows.device).view(1, W)).to(torch.int32)

    def write_through(self, layer_name: str, rows: Tensor, positions: Tensor, key: Tensor, value: Tensor) -> None:
        """New tokens (N,) of rows `rows` at `positions`, key / value (N, Hkv, D): into the host pool
        and into any resident hot slot of their block."""
        layer = self.layer_of[layer_name]
        host = self.host_slots(rows, positions).cpu()
        blocks, offs = host // self.block_size, host % self.block_size
        k_host, v_host = self.pool.layer(layer)  # (NB, Hkv, bs, D)
        k_host[blocks, :, offs] = key.to("cpu", self.pool.dtype)
        v_host[blocks, :, offs] = value.to("cpu", self.pool.dtype)
        self.cache.write_through(layer, rows, positions, key, value)

    def attend(self, layer_name: str, query: Tensor, rows: Tensor, positions: Tensor, scale: float) -> Tensor:
        """Exact attention over `positions` read through the hot cache.

        query (B, Hq, D); rows (B,) int64; positions (B, Hkv, P) int32 -1 padded -> (B, Hq, D)."""
        from asynctls_tip_kernels import sparse_decode_reference as ref

        layer = self.layer_of[layer_name]
        if self._begun != self._step:  # first offloaded layer of this step
            self._begun, self._rows = self._step, rows
            self.prefetcher.begin_step(rows, self.last_need[:, rows])
        elif not torch.equal(rows, self._rows):  # one decode batch per step; a host check on CPU
            raise RuntimeError("asynctls offload: the rows of a step changed between layers")
        need = needed_blocks(positions, self.block_size)  # (B, Hkv, P)
        table = self.prefetcher.acquire(layer, need)  # (B * Hkv, W)
        self.last_need[layer, rows, :, : need.shape[-1]] = need
        qf, pf = fold_heads(query, positions)  # (B * Hkv, G, D), (B * Hkv, 1, P)
        hot_k, hot_v = self.cache.layer_cache(layer)
        out = unfold_output(ref.sparse_attention(qf, hot_k, hot_v, table, pf, scale), query.shape[0])
        if layer == len(self.layer_names) - 1:
            self.prefetcher.end_step()
        return out

    def prefetch(self, layer_name: str) -> None:
        layer = self.layer_of.get(layer_name)
        if layer is not None and self._begun == self._step:
            self.prefetcher.prefetch(layer)


# ==============================================================================================
# The connector
# ==============================================================================================


class AsyncTLSOffloadConnector(KVConnectorBase_V1):
    """Scheduler side: hot-cache rows per request. Worker side: the `OffloadRuntime`."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        from vllm_asynctls.config import AsyncTLSConfig

        self.asynctls = AsyncTLSConfig.from_vllm_config(vllm_config)
        if not self.asynctls.offload:
            raise ValueError(
                f"kv_connector {CONNECTOR_NAME} serves the asynctls KV offload; set asynctls knob offload=true "
                f"(--additional-config '{{\"asynctls\": {{\"offload\": true}}}}') or drop the connector")
        self.max_rows = vllm_config.scheduler_config.max_num_seqs
        # scheduler side
        self._row_of: dict[str, int] = {}
        self._free_rows = list(range(self.max_rows - 1, -1, -1))
        self._manager: AsyncTLSOffloadManager | None = None
        self._group = -1

    # --- scheduler side ---------------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        managers = kv_cache_manager.coordinator.single_type_managers
        ours = [i for i, m in enumerate(managers) if isinstance(m, AsyncTLSOffloadManager)]
        if len(ours) != 1:
            raise ValueError(
                f"kv_connector {CONNECTOR_NAME}: expected one KV cache group of AsyncTLSOffloadSpec layers (the "
                f"asynctls backend with offload=true reports them); found {len(ours)} among "
                f"{[type(m).__name__ for m in managers]}. Serve with --attention-backend asynctls")
        self._group = ours[0]
        self._manager = managers[self._group]

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False  # nothing is ever loaded from outside

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        # Called when the scheduler admits a request from the waiting queue, including a preempted one
        # coming back: its recompute prefills prompt + generated tokens, so its blocks stay until then.
        if request.num_tokens > request.num_prompt_tokens:
            self._manager.hold_until(request.request_id, request.num_tokens)

    def build_connector_meta(self, scheduler_output) -> AsyncTLSOffloadMetadata:
        md = AsyncTLSOffloadMetadata(hot_first_block=self._manager.hot_cache_first_block)
        for req_id in scheduler_output.preempted_req_ids or ():
            self._release(req_id)  # its blocks are gone; it is re-prefilled (and re-rowed) on resumption
        coordinator = self._kv_cache_manager.coordinator
        for req_id in scheduler_output.num_scheduled_tokens:
            row = self._row_of.get(req_id)
            if row is None:
                if not self._free_rows:
                    raise RuntimeError(f"asynctls offload: no free hot-cache row for request {req_id} "
                                       f"({self.max_rows} rows = max_num_seqs)")
                row = self._row_of[req_id] = self._free_rows.pop()
                md.reset_rows.append(row)
            blocks = coordinator.get_blocks(req_id)[self._group]
            md.block0_rows[blocks[0].block_id] = row
        return md

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self._release(request.request_id)
        return False, None

    def _release(self, req_id: str) -> None:
        row = self._row_of.pop(req_id, None)
        if row is not None:
            self._free_rows.append(row)

    # --- worker side ------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Tensor]) -> None:
        global _RUNTIME
        from vllm.model_executor.models.utils import extract_layer_index

        from vllm_asynctls.offload.config import hot_cache_blocks_needed

        specs = {}
        for group in self._kv_cache_config.kv_cache_groups:
            per_layer = getattr(group.kv_cache_spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
            for name in group.layer_names:
                specs[name] = per_layer[name] if per_layer else group.kv_cache_spec
        names = sorted((n for n in kv_caches if isinstance(specs.get(n), AsyncTLSOffloadSpec)), key=extract_layer_index)
        if not names:
            raise ValueError(f"kv_connector {CONNECTOR_NAME}: no layer has an AsyncTLSOffloadSpec; serve with "
                             f"--attention-backend asynctls")
        spec = specs[names[0]]
        a = self.asynctls
        selected, pinned = hot_cache_blocks_needed(a.token_budget, a.num_blocks, a.selection_block_size,
                                                   a.sink_tokens, a.local_tokens, spec.block_size)
        _RUNTIME = OffloadRuntime(names, kv_caches, spec, max_blocks_per_step=selected + pinned,
                                  attended_tokens=a.sink_tokens + a.local_tokens + a.token_budget,
                                  prefetch_depth=a.offload_prefetch_depth)
        from vllm_asynctls.counters import COUNTERS

        COUNTERS.attach_offload_metrics(_RUNTIME.metrics)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if _RUNTIME is not None and isinstance(connector_metadata, AsyncTLSOffloadMetadata):
            _RUNTIME.apply(connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return None  # the step begins at its first offloaded layer (vLLM may call this after the forward)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if _RUNTIME is not None:
            _RUNTIME.prefetch(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Tensor, attn_metadata, **kwargs: Any) -> None:
        return None  # written through before attention, in the impl's do_kv_cache_update

    def wait_for_save(self) -> None:
        return None
