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
    with pytest.raises(ValueError, match=r"offload_hot_blocks must be >= 35 .*got 8"):
        cfg.check_against(token_budget=2048, sink_tokens=64, local_tokens=64, block_size=64, selection_block_size=64)


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
