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

Inside vLLM 0.32 (the design and why it was chosen over HiSparse's data plane and native CPU
offloading: `connector.py`'s docstring)
-----------------------------------------------------------------------------------------------
- `spec.py`: `AsyncTLSOffloadSpec` / `AsyncTLSOffloadManager`, registered in vLLM's
  `KVCacheSpecRegistry` (at import of `spec.py`, which vLLM's unpickling of the spec triggers in the
  engine-core process; `register()` does it explicitly). The asynctls backend reports the spec for its
  layers when `offload` is on (`AsyncTLSAttentionBackend.customize_spec`); the manager frees a
  decoding long request's blocks (its K/V is in the host pool) and reserves the hot caches inside the
  device pool, so the scheduler admits requests by their hot-cache footprint, not their context.
- `connector.py`: `AsyncTLSOffloadConnector` (loaded with `kv_connector_module_path`): hot-cache rows
  per request on the scheduler side; on the worker the `OffloadRuntime` (host pool, hot cache bound
  to the reserved device blocks, prefetcher) that the attention impl (backend.py) writes through and
  reads through.
- Metrics: `OffloadMetrics.snapshot()` joins `vllm_asynctls.counters.snapshot()` (`offload_*` keys).
"""

from .config import OFFLOAD_KNOBS, OffloadConfig, hot_cache_blocks_needed
from .host_pool import HostKVPool, host_memory_available
from .hot_cache import PINNED, HotBlockCache, fold_heads, needed_blocks, unfold_output
from .prefetch import OffloadMetrics, Prefetcher, copy_missed_blocks


def register() -> None:
    """Register the offload's KV cache spec with vLLM (idempotent; needs vLLM). The connector itself
    is loaded by vLLM from `kv_transfer_config` (`connector.kv_transfer_config()`)."""
    from .spec import register_offload_spec

    register_offload_spec()


__all__ = [
    "register",
    "OFFLOAD_KNOBS",
    "OffloadConfig",
    "hot_cache_blocks_needed",
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
