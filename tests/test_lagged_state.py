"""Lagged selection inside vLLM: the per-layer state that carries each request's block choice from one
decode step to the next (`vllm_asynctls.lagged_state`), on CPU tensors.

What is shown:
- A row with no usable entry (first sparse step, skipped step, padding) selects inside its most
  recent selectable blocks.
- A step reads back exactly what its request's previous step recorded, whichever batch row the request
  moved to, across selection-block and cache-block boundaries; padded rows write nowhere a request reads.
- Decoding through the state equals the reference's lagged decode chained by hand per request.
- The knob: validated at configuration time, counted in the index's memory share.
"""

from __future__ import annotations

import pytest
import torch
from test_sparse_reference import build_case, build_index

from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from vllm_asynctls.config import AsyncTLSConfig
from vllm_asynctls.lagged_state import LaggedBlockState

CONFIG = SparseAttentionConfig(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                               local_tokens=16, index_bits=4, index_channels=8, lagged_selection=True)


def _state(num_cache_blocks=12, cache_block_size=64, hkv=2, config=CONFIG) -> LaggedBlockState:
    return LaggedBlockState(num_cache_blocks, cache_block_size, hkv, config, "cpu")


def _ids(*rows, hkv=2) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32).unsqueeze(1).expand(-1, hkv, -1).contiguous()


def test_a_row_without_a_previous_step_selects_inside_its_most_recent_blocks():
    state = _state()
    table = torch.randperm(12)[:8].view(2, 4).to(torch.int32).repeat(3, 1)  # (6, 4)
    # Last selectable position L - 17: block 11 at L = 200, block 1 at L = 40, block 1 at L = 33 (its
    # first position), block 0 at L = 32, none at L = 10 or 0.
    got = state.previous(table, torch.tensor([200, 40, 33, 32, 10, 0], dtype=torch.int32))
    want = _ids([8, 9, 10, 11], [0, 1, -1, -1], [0, 1, -1, -1], [0, -1, -1, -1], [-1, -1, -1, -1],
                [-1, -1, -1, -1])
    assert torch.equal(got, want)
    assert got.dtype == torch.int32 and got.is_contiguous()


@pytest.mark.parametrize("length", [100, 112, 113, 128, 129, 130])
def test_a_step_reads_what_the_requests_previous_step_recorded_from_any_row(length):
    # length - 1 = the newest position at the recording step: 112 and 128 start a selection block,
    # 128 also a cache block (64 tokens), so the reading step's position L - 2 is in the slot before.
    state = _state()
    gen = torch.Generator().manual_seed(length)
    table = torch.randperm(12, generator=gen)[:9].view(3, 3).to(torch.int32)
    lens = torch.tensor([length, length - 37, length + 5], dtype=torch.int32)
    chosen = torch.randint(0, 8, (3, 2, 4), generator=gen, dtype=torch.int32)
    state.record(table, lens, chosen)
    order = torch.tensor([2, 0, 1])  # the requests moved to other batch rows
    got = state.previous(table[order], lens[order] + 1)
    assert torch.equal(got, chosen[order])
    # One step skipped (the entry's length is not L - 1): the fallback, not a stale choice.
    skipped = state.previous(table, lens + 2)
    assert torch.equal(skipped, state.recent_blocks(lens + 2))


def test_padded_rows_write_nowhere_a_request_reads():
    # A request one token long recorded at the slot of position 0; padded rows (seq_len 0) whose table
    # rows alias it must not overwrite that slot, which its next step reads.
    state = _state()
    table = torch.tensor([[3, 5, 7], [3, 5, 7], [3, 5, 7]], dtype=torch.int32)
    real = torch.tensor([1], dtype=torch.int32)
    mine = _ids([1, 2, 5, 7])
    state.record(table[:1], real, mine)
    state.record(table, torch.tensor([1, 0, 0], dtype=torch.int32), _ids([1, 2, 5, 7], [0, 0, 0, 0], [9, 9, 9, 9]))
    assert torch.equal(state.previous(table[:1], real + 1), mine)


def test_an_entry_left_by_another_request_is_not_used():
    # Request A recorded at length 150 in cache block 5 and finished; request B got block 5 for the
    # same positions and reaches length 151: the entry's length fits, its owner (A's first block) not.
    state = _state()
    a = torch.tensor([[3, 4, 5]], dtype=torch.int32)
    b = torch.tensor([[8, 9, 5]], dtype=torch.int32)
    lens = torch.tensor([150], dtype=torch.int32)
    state.record(a, lens, _ids([1, 2, 5, 7]))
    assert torch.equal(state.previous(b, lens + 1), state.recent_blocks(lens + 1))
    assert torch.equal(state.previous(a, lens + 1), _ids([1, 2, 5, 7]))
    assert int(state.hits) == 1  # only A's read used an entry


def test_decoding_through_the_state_equals_the_reference_chained_per_request():
    # Three requests decode 5 steps, the batch rows shuffled every step (as vLLM's persistent batch
    # does); each step's selection through the state must equal the reference's lagged decode with
    # the previous block ids passed by hand (first step: the most recent blocks).
    steps = 5
    final = [162, 131, 95]  # mid-run, 160 starts a selection block (16), 128 a cache block (64)
    case = build_case(final, 64, 2, 4, 32, seed=4)
    index = build_index(case, CONFIG)
    state = _state(num_cache_blocks=case.key_cache.shape[0], cache_block_size=64)
    gen = torch.Generator().manual_seed(9)
    by_hand = [None] * len(final)
    lagged_differs = False
    for t in range(steps):
        lens = torch.tensor(final, dtype=torch.int32) - (steps - 1 - t)
        queries = torch.randn(len(final), 8, 32, generator=gen)
        order = torch.randperm(len(final), generator=gen)
        table, seq_lens, q = case.block_table[order], lens[order], queries[order]
        previous = state.previous(table, seq_lens)
        out, pos, blocks = ref.sparse_decode(q, case.key_cache, case.value_cache, table, seq_lens, index, CONFIG,
                                             0.2, previous_block_ids=previous)
        state.record(table, seq_lens, blocks)
        for row, b in enumerate(order.tolist()):
            prev = by_hand[b] if by_hand[b] is not None else state.recent_blocks(lens[b:b + 1])
            want_out, want_pos, want_blocks = ref.sparse_decode(
                queries[b:b + 1], case.key_cache, case.value_cache, case.block_table[b:b + 1], lens[b:b + 1],
                index, CONFIG, 0.2, previous_block_ids=prev)
            assert torch.equal(pos[row], want_pos[0]), (t, b)
            torch.testing.assert_close(out[row], want_out[0], rtol=0, atol=0)
            by_hand[b] = want_blocks
            unlagged = ref.sparse_decode(queries[b:b + 1], case.key_cache, case.value_cache, case.block_table[b:b + 1],
                                         lens[b:b + 1], index, CONFIG.with_(lagged_selection=False), 0.2)[1]
            lagged_differs |= not torch.equal(unlagged[0], want_pos[0])
    assert lagged_differs  # the lag changes some selection, so the equality above is not vacuous
    assert int(state.hits) == len(final) * (steps - 1)  # every step after a request's first read its entry


def test_the_knob_is_validated_and_counted_in_the_index_memory():
    with pytest.raises(ValueError, match=r"lagged_selection=true needs mode 'asynctls', offload=false.*offload=True"):
        AsyncTLSConfig(lagged_selection=True, offload=True)
    with pytest.raises(ValueError, match=r"lagged_selection=true needs mode 'asynctls'.*mode='block_only'"):
        AsyncTLSConfig(lagged_selection=True, mode="block_only")
    with pytest.raises(ValueError, match=r"local_tokens >= 1.*local_tokens=0"):
        AsyncTLSConfig(lagged_selection=True, local_tokens=0)
    with pytest.raises(ValueError, match=r"asynctls knob lagged_selection must be a bool; got 'yes'"):
        AsyncTLSConfig(lagged_selection="yes")
    on = AsyncTLSConfig(lagged_selection=True, selection_block_size=64, num_blocks=128)
    off = AsyncTLSConfig(selection_block_size=64, num_blocks=128)
    assert on.sparse_config(128, False).lagged_selection and not off.sparse_config(128, False).lagged_selection
    # 8 more bytes per token and kv head (128 block ids of 4 bytes per 64 tokens) beside 512 of K/V.
    index_off = off.index_fraction(128, False, 2) * 512 / (1 - off.index_fraction(128, False, 2))
    index_on = on.index_fraction(128, False, 2) * 512 / (1 - on.index_fraction(128, False, 2))
    assert index_on - index_off == pytest.approx(8.0)


def test_lagged_decode_with_a_covering_budget_equals_dense_attention_at_every_step():
    # The block stage of a lagged step ranks the next step's candidates, so the block whose first
    # token leaves the local window next step is kept: with every block affordable, each step of the
    # chain attends to every position (float32: equal to dense to rounding). Steps cross positions
    # where a new selection block becomes selectable (L - local_tokens = 96, 112).
    config = CONFIG.with_(num_blocks=16, token_budget=256)
    final = [115, 100]
    case = build_case(final, 64, 2, 4, 32, seed=6)
    index = build_index(case, config)
    state = _state(num_cache_blocks=case.key_cache.shape[0], cache_block_size=64, config=config)
    gen = torch.Generator().manual_seed(2)
    for t in range(6):
        lens = torch.tensor(final, dtype=torch.int32) - (5 - t)
        q = torch.randn(2, 8, 32, generator=gen)
        previous = state.previous(case.block_table, lens)
        out, pos, blocks = ref.sparse_decode(q, case.key_cache, case.value_cache, case.block_table, lens, index,
                                             config, 0.2, previous_block_ids=previous)
        state.record(case.block_table, lens, blocks)
        dense = ref.dense_decode_attention(q, case.key_cache, case.value_cache, case.block_table, lens, 0.2)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
        for b, L in enumerate(lens.tolist()):
            assert sorted(p for p in pos[b, 0].tolist() if p >= 0) == list(range(L)), (t, b)


def test_without_the_next_step_ranking_a_lagged_step_would_miss_a_token():
    # The same chain with the block stage ranking this step's candidates only (the one-token-shorter
    # local window undone) loses the token that just left the window: the test above is not vacuous.
    config = CONFIG.with_(num_blocks=16, token_budget=256)
    case = build_case([113], 64, 2, 4, 32, seed=6)
    index = build_index(case, config)
    q = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([112], dtype=torch.int32)
    this_step = ref.select_blocks(q, index, case.block_table, lens, config, 0.2)
    next_step = ref.select_blocks(q, index, case.block_table, lens, ref.lagged_block_config(config), 0.2)
    # Next step (L = 113) position 96 = 113 - 16 - 1 becomes selectable; its block 6 is only in the
    # next-step ranking.
    assert 6 not in this_step[0, 0].tolist() and 6 in next_step[0, 0].tolist()
    _, pos, _ = ref.sparse_decode(q, case.key_cache, case.value_cache, case.block_table, lens + 1, index, config,
                                  0.2, previous_block_ids=this_step)
    assert 96 not in pos[0, 0].tolist()
