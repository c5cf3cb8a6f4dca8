"""KV offload data plane on CPU: hot cache + host pool give the same attention as the full cache,
hit rates, LRU eviction with pinned blocks, layer-ahead prefetch, start-up errors. No engine."""

from __future__ import annotations

import math

import pytest
import torch

from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from vllm_asynctls.offload import (
    HostKVPool,
    HotBlockCache,
    OffloadConfig,
    Prefetcher,
    fold_heads,
    needed_blocks,
    unfold_output,
)

BS = 16  # KV block size (offload unit)
HKV, HQ, D = 2, 4, 16


def _setup(seq_lens, num_layers, hot_blocks, max_blocks_per_step, cfg, seed=0):
    """Full paged caches per layer (the truth), a host pool holding the same bytes, a hot cache."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    W = math.ceil(max(seq_lens) / BS)
    block_table = torch.arange(B * W, dtype=torch.int32).view(B, W)  # (B, W)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    layers = []
    pool = HostKVPool(num_layers, B * W, BS, HKV, D, dtype=torch.float32, pin=False)
    for layer in range(num_layers):
        k = torch.randn(B * W, BS, HKV, D, generator=g)  # (blocks, bs, Hkv, D)
        v = torch.randn(B * W, BS, HKV, D, generator=g)
        index = ref.allocate_index(B * W, BS, HKV, D, cfg, torch.float32, "cpu")
        slots = torch.cat([block_table[b].long().repeat_interleave(BS) * BS + torch.arange(W * BS) % BS
                           for b in range(B)])
        pos = torch.cat([torch.arange(W * BS) for _ in range(B)])
        keep = pos < seq.repeat_interleave(W * BS)
        ref.write_index(index, k.view(-1, HKV, D)[slots][keep], slots[keep], cfg)
        pool.data[layer, 0] = k.permute(0, 2, 1, 3)  # (blocks, Hkv, bs, D)
        pool.data[layer, 1] = v.permute(0, 2, 1, 3)
        layers.append((k, v, index))
    cache = HotBlockCache(num_layers, B, HKV, hot_blocks, BS, D, W, pinned_blocks=1,
                          max_blocks_per_step=max_blocks_per_step, dtype=torch.float32)
    prefetcher = Prefetcher(cache, pool, block_table.clone())
    rows = torch.arange(B)
    for layer in range(num_layers):  # sink block 0 of every head pinned
        prefetcher.pin(layer, rows, torch.zeros(B, HKV, 1, dtype=torch.int32))
    return layers, block_table, seq, pool, cache, prefetcher, rows


def _run_steps(layers, block_table, seq, cache, prefetcher, rows, cfg, queries, use_hints=True):
    """Decode steps: selection on the full cache (reference), attention over the hot cache."""
    scale = D ** -0.5
    prev_need = None
    for q in queries:
        sel = [ref.sparse_decode(q, k, v, block_table, seq, idx, cfg, scale) for k, v, idx in layers]
        need = torch.stack([needed_blocks(pos, BS) for _, pos, _ in sel])  # (L, B, Hkv, P)
        prefetcher.begin_step(rows, prev_need if use_hints else None)
        for layer, (out_full, positions, _) in enumerate(sel):
            table = prefetcher.acquire(layer, need[layer])
            qf, pf = fold_heads(q, positions)
            hk, hv = cache.layer_cache(layer)
            out_hot = unfold_output(ref.sparse_attention(qf, hk, hv, table, pf, scale), q.shape[0])
            torch.testing.assert_close(out_hot, out_full, rtol=1e-6, atol=1e-6)
        prefetcher.end_step()
        prev_need = need


def test_hot_cache_attention_equals_full_cache_attention():
    cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                                local_tokens=16, index_channels=8, index_bits=16)
    # Per head a step reads <= 4 selected blocks + sink + 2 local blocks = 7; 9 hot slots vs 19-20 blocks.
    layers, bt, seq, pool, cache, pf, rows = _setup([300, 257], 2, hot_blocks=9, max_blocks_per_step=7, cfg=cfg)
    g = torch.Generator().manual_seed(1)
    queries = [torch.randn(2, HQ, D, generator=g) for _ in range(6)]
    _run_steps(layers, bt, seq, cache, pf, rows, cfg, queries)
    m = pf.metrics.snapshot()
    assert m["offload_evict_overflow"] == 0
    assert m["offload_blocks_copied"] > 0  # the hot cache is far smaller than the context: misses happen
    assert 0.0 < m["offload_hit_rate"] < 1.0
    assert m["offload_bytes_copied"] == m["offload_blocks_copied"] * 2 * BS * D * 4
    assert m["offload_steps"] == 6
    assert cache.nbytes < pool.nbytes


def test_hit_rate_one_when_budget_covers_context():
    cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=32, token_budget=512, sink_tokens=16,
                                local_tokens=16, index_channels=8, index_bits=16)
    layers, bt, seq, pool, cache, pf, rows = _setup([300, 257], 1, hot_blocks=21, max_blocks_per_step=19, cfg=cfg)
    g = torch.Generator().manual_seed(2)
    queries = [torch.randn(2, HQ, D, generator=g) for _ in range(8)]
    _run_steps(layers, bt, seq, cache, pf, rows, cfg, queries[:1])  # cold: every block copied once
    first = pf.metrics.snapshot()
    assert first["offload_blocks_copied"] == 2 * HKV * 19 - 2 * HKV  # all blocks but the pinned sink
    pf.metrics.reset()
    _run_steps(layers, bt, seq, cache, pf, rows, cfg, queries[1:])
    m = pf.metrics.snapshot()
    assert m["offload_hit_rate"] == 1.0 and m["offload_blocks_copied"] == 0


def test_same_selection_on_consecutive_steps_hits_and_prefetch_hides_all_copies():
    cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                                local_tokens=16, index_channels=8, index_bits=16)
    layers, bt, seq, pool, cache, pf, rows = _setup([300, 257], 2, hot_blocks=9, max_blocks_per_step=7, cfg=cfg)
    q = torch.randn(2, HQ, D, generator=torch.Generator().manual_seed(3))
    _run_steps(layers, bt, seq, cache, pf, rows, cfg, [q])
    pf.metrics.reset()
    _run_steps(layers, bt, seq, cache, pf, rows, cfg, [q, q, q])
    assert pf.metrics.snapshot()["offload_hit_rate"] == 1.0

    # Prefetch with an exact hint (lagged selection): the demand lookups that follow copy nothing.
    q2 = torch.randn(2, HQ, D, generator=torch.Generator().manual_seed(4))
    scale = D ** -0.5
    need = torch.stack([needed_blocks(ref.sparse_decode(q2, k, v, bt, seq, i, cfg, scale)[1], BS)
                        for k, v, i in layers])
    pf.begin_step(rows, need)
    pf.prefetch(0)
    pf.prefetch(1)
    before = cache.counters.clone()
    for layer in range(2):
        pf.acquire(layer, need[layer])
    delta = cache.counters - before
    assert delta[:, 2].sum() == 0 and torch.equal(delta[:, 0], delta[:, 1])  # no copies, all hits
    pf.end_step()


def test_lru_eviction_keeps_recent_and_pinned_blocks():
    c = HotBlockCache(1, 1, 1, hot_blocks=4, block_size=BS, head_dim=D, max_blocks_per_seq=20,
                      pinned_blocks=1, max_blocks_per_step=2, dtype=torch.float32)
    rows = torch.tensor([0])

    def step(blocks, pin=False):
        c.advance()
        stamp = torch.iinfo(torch.int64).max if pin else c.demand_stamp()
        _, miss, dst = c.resolve(0, rows, torch.tensor([[blocks]], dtype=torch.int32), stamp)
        return miss.view(-1).tolist()

    def resident():
        return sorted(b for b in c.resident(0, rows).view(-1).tolist() if b >= 0)

    assert step([0], pin=True) == [True]
    assert step([5, 6]) == [True, True]
    assert step([7]) == [True]
    assert resident() == [0, 5, 6, 7]
    assert step([5, 8]) == [False, True]  # 5 hits; 8 evicts 6, the least recently used
    assert resident() == [0, 5, 7, 8]
    assert step([9]) == [True]  # evicts 7 (used two steps ago), keeps 5 and 8 (last step)
    assert resident() == [0, 5, 8, 9]
    for b in range(10, 19, 2):  # many misses later the pinned sink is still there
        step([b, b + 1])
    assert 0 in resident()
    # The mapping and its inverse agree, and the block table points at the slot holding each block.
    table = c.block_table(0, rows).view(-1)
    for s, b in enumerate(c.resident(0, rows).view(-1).tolist()):
        if b >= 0:
            assert table[b].item() == s
    assert int((table >= 0).sum()) == len(resident())
    assert c.counters[0, 3].item() == 0  # no overflow

    # Unpinning makes the sink evictable like any block used this step.
    c.advance()
    c.unpin(0, rows, torch.tensor([[[0]]], dtype=torch.int32))
    step([1, 2])
    step([3, 4])
    assert 0 not in resident()


def test_too_small_hot_cache_is_a_start_up_error():
    with pytest.raises(ValueError, match="offload_hot_blocks must be >= .*got 5"):
        HotBlockCache(1, 1, 1, hot_blocks=5, block_size=BS, head_dim=D, max_blocks_per_seq=8,
                      pinned_blocks=2, max_blocks_per_step=4)
    with pytest.raises(ValueError, match="offload_hot_blocks must be an int >= 1; got 0"):
        OffloadConfig(offload=True, offload_hot_blocks=0)
    cfg = OffloadConfig.from_knobs({"offload": True, "offload_hot_blocks": 8, "token_budget": 2048})
    # 32 kept selection blocks of 64 tokens in 64-token cache blocks: 32 blocks, + 1 sink + 2 local.
    with pytest.raises(ValueError, match=r"offload_hot_blocks must be >= 35 .*got 8"):
        cfg.check_against(token_budget=2048, num_blocks=32, selection_block_size=64, sink_tokens=64,
                          local_tokens=64, block_size=64)
    # Selection blocks smaller than cache blocks: each kept one may sit in its own cache block.
    with pytest.raises(ValueError, match=r"offload_hot_blocks must be >= 515 .*got 8"):
        cfg.check_against(token_budget=2048, num_blocks=512, selection_block_size=16, sink_tokens=64,
                          local_tokens=64, block_size=64)
    # The token budget bounds it too (each selected token in its own block at worst).
    assert cfg.check_against(token_budget=4, num_blocks=512, selection_block_size=16, sink_tokens=64,
                             local_tokens=64, block_size=64) == 4 + 3


def test_host_pool_start_up_errors_name_sizes():
    with pytest.raises(RuntimeError, match=r"asked for \d+ B .* only \d+ B .* is available"):
        HostKVPool(32, 10**7, 64, 8, 128, dtype=torch.bfloat16, pin=False)  # ~2.4 PiB
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"pinning \d+ B .* needs CUDA.*available host memory \d+ B"):
            HostKVPool(1, 4, 16, 2, 16, pin=True)
    pool = HostKVPool(1, 4, 16, 2, 16, pin="auto")
    assert pool.pinned == torch.cuda.is_available()
    assert pool.allocate(3) == [0, 1, 2] and pool.num_free_blocks == 1
    with pytest.raises(RuntimeError, match="5 blocks asked, 1 free"):
        pool.allocate(5)


def test_host_pool_write_tokens_round_trips():
    pool = HostKVPool(1, 4, BS, HKV, D, dtype=torch.float32, pin=False)
    table = torch.tensor([2, 0], dtype=torch.int32)  # logical block 0 -> host 2, 1 -> host 0
    positions = torch.arange(20)
    k, v = torch.randn(20, HKV, D), torch.randn(20, HKV, D)
    pool.write_tokens(0, table, positions, k, v)
    hk, hv = pool.layer(0)
    torch.testing.assert_close(hk[2, :, :16].transpose(0, 1), k[:16])
    torch.testing.assert_close(hv[0, :, :4].transpose(0, 1), v[16:])


# ----------------------------------------------------------------------------------------------
# Inside vLLM, without an engine: the scheduler-side manager and the worker-side runtime
# ----------------------------------------------------------------------------------------------


def _offload_spec(block_size=BS, hot_rows=2, hot_blocks=6, threshold=40, max_model_len=256):
    from vllm_asynctls.offload.spec import AsyncTLSOffloadSpec

    return AsyncTLSOffloadSpec(block_size=block_size, num_kv_heads=HKV, head_size=D, dtype=torch.float32,
                               offload_threshold=threshold, hot_rows=hot_rows, hot_blocks=hot_blocks,
                               max_model_len=max_model_len)


def _manager(spec, num_blocks):
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_asynctls.offload.spec import AsyncTLSOffloadManager

    assert KVCacheSpecRegistry.get_manager_class(spec) is AsyncTLSOffloadManager  # registered at import
    pool = BlockPool(num_blocks, enable_caching=False, hash_block_size=spec.block_size)
    return AsyncTLSOffloadManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                  scheduler_block_size=spec.block_size), pool


def test_offload_manager_reserves_hot_caches_and_frees_a_decoding_request_past_the_threshold():
    spec = _offload_spec()  # 2 rows x 6 blocks reserved; max_model_len 256 = 16 blocks
    with pytest.raises(ValueError, match=r"has 27 free blocks .* hot caches need 12 .* needs 16 more, 28 in all"):
        _manager(spec, 28)  # 27 free (block 0 is vLLM's null block) < 12 + 16
    m, pool = _manager(spec, 64)
    assert [b.block_id for b in m.hot_cache_blocks] == list(range(1, 13)) and m.hot_cache_first_block == 1
    free0 = pool.get_num_free_blocks()
    m.allocate_new_blocks("r", 100, 100)  # a 100-token prompt: 7 blocks
    m.remove_skipped_blocks("r", 64, num_prompt_tokens=100)  # still prefilling: nothing freed
    assert pool.get_num_free_blocks() == free0 - 7
    m.remove_skipped_blocks("r", 100, num_prompt_tokens=100)  # decoding, 100 > threshold 40
    blocks = m.req_to_blocks["r"]
    # Block 0 (the worker's request key) and the block of the last committed token stay.
    assert blocks[0].block_id != 0 and blocks[-1].block_id != 0
    assert all(b.block_id == 0 for b in blocks[1:6])  # replaced by the null block
    assert pool.get_num_free_blocks() == free0 - 2
    # A short request decoding below the threshold keeps everything (it decodes densely).
    m.allocate_new_blocks("s", 30, 30)
    m.remove_skipped_blocks("s", 30, num_prompt_tokens=20)
    assert all(b.block_id != 0 for b in m.req_to_blocks["s"])
    # A preempted request re-admitted with 110 tokens (prompt 100 + 10 generated) recomputes them all as
    # a prefill: its blocks stay until the recompute is done.
    m.free("r")
    m.allocate_new_blocks("r", 64, 64)
    m.hold_until("r", 110)
    m.allocate_new_blocks("r", 105, 105)
    m.remove_skipped_blocks("r", 105, num_prompt_tokens=100)  # past the prompt, inside the recompute
    assert all(b.block_id != 0 for b in m.req_to_blocks["r"])
    m.allocate_new_blocks("r", 111, 111)
    m.remove_skipped_blocks("r", 110, num_prompt_tokens=100)
    assert [b.block_id == 0 for b in m.req_to_blocks["r"]] == [False] + [True] * 5 + [False]
    # No prefix-cache hits for offloaded groups.
    hit, n = type(m).find_longest_cache_hit([], 100, [0], pool, spec, False, BS)
    assert hit == ([],) and n == 0


def test_offload_spec_merges_layers_and_keeps_its_fields():
    from vllm_asynctls.offload.spec import AsyncTLSOffloadSpec

    spec = _offload_spec()
    merged = AsyncTLSOffloadSpec.merge([spec, spec])
    assert merged == spec and type(merged) is AsyncTLSOffloadSpec
    with pytest.raises(ValueError, match="share one offload setting"):
        AsyncTLSOffloadSpec.merge([spec, _offload_spec(hot_blocks=7)])


def test_offload_runtime_attends_through_hot_storage_in_reserved_kv_blocks():
    """The worker path on fake vLLM KV caches: write-through of a prompt, hot slots bound to the
    reserved blocks, attention through the hot cache equals attention over the full context."""
    from vllm_asynctls.offload.connector import AsyncTLSOffloadMetadata, OffloadRuntime

    spec = _offload_spec(hot_rows=2, hot_blocks=6, max_model_len=128)
    L, nb = 2, 40
    names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    kv = {n: torch.full((nb, HKV, BS, 2 * D), 7.0) for n in names}  # CPU_ATTN-shaped, garbage-filled
    rt = OffloadRuntime(names, kv, spec, max_blocks_per_step=5, attended_tokens=48, prefetch_depth=1)
    rt.apply(AsyncTLSOffloadMetadata(block0_rows={30: 1, 20: 0}, reset_rows=[0, 1], hot_first_block=1))
    # The hot slots are views of blocks [1, 13) of every layer's KV tensor.
    hk, hv = rt.cache.layer_cache(1)
    assert hk.data_ptr() == kv[names[1]][1].data_ptr() and hv.untyped_storage().data_ptr() == \
        kv[names[1]].untyped_storage().data_ptr()
    g = torch.Generator().manual_seed(5)
    seq = 100
    keys = [torch.randn(seq, HKV, D, generator=g) for _ in names]
    values = [torch.randn(seq, HKV, D, generator=g) for _ in names]
    rows = rt.rows_of(torch.tensor([30]))  # the request keyed by first block 30 has row 1
    assert rows.tolist() == [1]
    pos = torch.arange(seq)
    for n, k, v in zip(names, keys, values):
        rt.write_through(n, rows.expand(seq), pos, k, v)
    scale = D ** -0.5
    for step in range(3):
        q = torch.randn(1, HQ, D, generator=g)
        # Sinks 0..15, local window, a few selected positions in different blocks.
        positions = torch.tensor([list(range(16)) + list(range(seq - 16, seq)) + [20, 45, 46, 70] + [-1] * 12] * HKV,
                                 dtype=torch.int32).unsqueeze(0)  # (1, Hkv, 48)
        for li, (n, k, v) in enumerate(zip(names, keys, values)):
            out = rt.attend(n, q, rows, positions, scale)
            full_k, full_v = k.unsqueeze(1), v.unsqueeze(1)  # (seq, 1, Hkv, D): one-token blocks
            table = torch.arange(seq, dtype=torch.int32).unsqueeze(0)
            want = ref.sparse_attention(q, full_k, full_v, table, positions, scale)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        # A new token written through lands in the resident tail block of the hot cache too.
        if step == 0:
            new_k, new_v = torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g)
            for i, n in enumerate(names):
                keys[i] = torch.cat([keys[i], new_k])
                values[i] = torch.cat([values[i], new_v])
                rt.write_through(n, rows, torch.tensor([seq]), new_k, new_v)
            seq += 1
        rt.apply(AsyncTLSOffloadMetadata(block0_rows={30: 1}, hot_first_block=1))
    m = rt.metrics.snapshot()
    assert m["offload_evict_overflow"] == 0 and m["offload_steps"] == 3
    assert m["offload_blocks_copied"] > 0 and m["offload_hit_rate"] > 0.5
    # Blocks outside the reserved range were never touched.
    assert bool((kv[names[0]][13:] == 7.0).all()) and bool((kv[names[0]][0] == 7.0).all())


def test_prefill_over_offloaded_blocks_fails_loudly():
    """The backend's safety net for the manager's invariant (prefills read no freed block)."""
    from types import SimpleNamespace

    from vllm_asynctls.backend import _check_prefill_reads_resident_blocks as check

    query_lens = torch.tensor([1, 40])  # a decode, and a 40-token chunk after 100 computed tokens
    seq_lens = torch.tensor([300, 140])
    ok = SimpleNamespace(block_table_tensor=torch.tensor([[5, 0, 0, 9, 0, 0, 0, 0, 0, 0],  # decode: gaps fine
                                                          [3, 4, 6, 7, 8, 11, 12, 13, 14, 0]]))
    check(ok, query_lens, seq_lens, block_size=BS)
    freed = SimpleNamespace(block_table_tensor=torch.tensor([[5, 0, 0, 9, 0, 0, 0, 0, 0, 0],
                                                             [3, 4, 0, 7, 8, 11, 12, 13, 14, 0]]))
    with pytest.raises(RuntimeError, match="prefill chunk would read KV blocks already moved to the host pool"):
        check(freed, query_lens, seq_lens, block_size=BS)


def test_connector_scheduler_side_rows_and_preemption():
    """Hot-cache rows per request (reset when given, freed at the end or on preemption), the first-block
    map the worker keys requests on, and the recompute hold for a re-admitted preempted request."""
    from types import SimpleNamespace

    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_asynctls.offload.connector import AsyncTLSOffloadConnector, kv_transfer_config

    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(**kv_transfer_config()),
        additional_config={"asynctls": {"offload": True}},
        scheduler_config=SimpleNamespace(max_num_seqs=2),
    )
    conn = AsyncTLSOffloadConnector(vllm_config, KVConnectorRole.SCHEDULER, None)
    manager, pool = _manager(_offload_spec(hot_rows=2), 64)
    coordinator = SimpleNamespace(single_type_managers=[manager], get_blocks=lambda r: (manager.req_to_blocks[r],))
    conn.bind_kv_cache_manager(SimpleNamespace(coordinator=coordinator, block_pool=pool))
    for r in ("a", "b", "c"):
        manager.allocate_new_blocks(r, 40, 40)

    def step(scheduled, preempted=()):
        return conn.build_connector_meta(SimpleNamespace(num_scheduled_tokens={r: 1 for r in scheduled},
                                                         preempted_req_ids=set(preempted)))

    md = step(["a", "b"])
    first = {r: manager.req_to_blocks[r][0].block_id for r in "abc"}
    assert md.hot_first_block == 1 and sorted(md.reset_rows) == [0, 1]
    assert md.block0_rows == {first["a"]: 0, first["b"]: 1}
    with pytest.raises(RuntimeError, match="no free hot-cache row for request c"):
        step(["c"])  # both rows taken (max_num_seqs = 2)
    md = step(["b", "c"], preempted=["a"])  # a's row goes to c, reset
    assert md.reset_rows == [0] and md.block0_rows == {first["b"]: 1, first["c"]: 0}
    assert conn.request_finished(SimpleNamespace(request_id="b"), []) == (False, None)
    assert step(["c"]).reset_rows == []
    # A preempted request coming back with generated tokens: its blocks stay until the recompute ends.
    conn.update_state_after_alloc(SimpleNamespace(request_id="a", num_tokens=110, num_prompt_tokens=100), None, 0)
    assert manager._prefill_end == {"a": 110}
    conn.update_state_after_alloc(SimpleNamespace(request_id="d", num_tokens=100, num_prompt_tokens=100), None, 0)
    assert "d" not in manager._prefill_end
