"""Every Triton kernel of the AsyncTLS GPU path against the plain-PyTorch reference.

Fresh random inputs per case: a shuffled block table over a cache full of garbage, ragged sequence
lengths (one shorter than sinks + local window, one with a partly filled last block), GQA with an odd
group, MLA (value = first Dv channels of the key cache) and the exact and low-bit indexes, plus the
benchmark's shapes scaled down. Selections are compared as sets of reference scores (a near-tie can
swap two ids whose scores differ by float32 rounding; any other difference fails), outputs with a
per-dtype tolerance.

Compiled on a CUDA device (`@pytest.mark.gpu`). Without CUDA, `tests/test_triton_kernels_interpreted.py`
runs this file under Triton's interpreter in a child process (what CI does, about 90 s), or by hand:
`TRITON_INTERPRET=1 ASYNCTLS_TEST_INTERPRET=1 pytest tests/test_triton_kernels.py`.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ASYNCTLS_TEST_INTERPRET") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("Triton kernel tests need a CUDA device (or TRITON_INTERPRET=1 ASYNCTLS_TEST_INTERPRET=1)",
                allow_module_level=True)

triton = pytest.importorskip("triton")

from asynctls_tip_kernels import sparse_decode_reference as ref  # noqa: E402
from asynctls_tip_kernels import block_select  # noqa: E402
from asynctls_tip_kernels.block_select import block_scores_triton, select_blocks_triton, topk_rows  # noqa: E402
from asynctls_tip_kernels.index_basis import rotate_triton  # noqa: E402
from asynctls_tip_kernels import index_write  # noqa: E402
from asynctls_tip_kernels.index_write import IndexWriteWorkspace, warm_write_index, write_index_triton  # noqa: E402
from asynctls_tip_kernels import sparse_attention  # noqa: E402
from asynctls_tip_kernels.sparse_attention import sparse_attention_triton  # noqa: E402
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig  # noqa: E402
from asynctls_tip_kernels import sparse_decode  # noqa: E402
from asynctls_tip_kernels.sparse_decode import (  # noqa: E402
    SparseDecodeWorkspace, sparse_decode_triton, warm_decode_attention)
from asynctls_tip_kernels.token_select import (  # noqa: E402
    build_index_query, index_query_triton, select_tokens_triton, token_scores_triton, word_score_heads)
from test_sparse_reference import adversarial_summaries, assert_exact_summary, fill_summaries_with_junk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Output tolerance per dtype (atol = rtol): bf16 output rounding is 2^-8 relative.
OUT_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Score tolerance relative to the row's largest |score| (float32 accumulation order only).
SCORE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


# name: (seq_lens, cbs, Hkv, group, Dk, Dv, mla, config kwargs, dtype)
SMALL = {
    "small_gqa_odd_4bit": ([5, 97, 64, 150], 16, 2, 3, 40, 24, False,
                           dict(selection_block_size=8, num_blocks=6, token_budget=20, sink_tokens=4,
                                local_tokens=8, index_channels=12, index_bits=4), torch.float32),
    "small_gqa_8bit_bf16": ([70, 33, 128], 16, 2, 4, 64, 64, False,
                            dict(selection_block_size=16, num_blocks=4, token_budget=40, sink_tokens=8,
                                 local_tokens=8, index_channels=16, index_bits=8), torch.bfloat16),
    "small_gqa_odd_words_4bit": ([3, 77, 130], 16, 2, 3, 48, 32, False,
                                 dict(selection_block_size=8, num_blocks=5, token_budget=16, sink_tokens=2,
                                      local_tokens=6, index_channels=8, index_bits=4), torch.float32),
    "small_exact_16bit": ([45, 120], 8, 3, 2, 32, 32, False,
                          dict(selection_block_size=4, num_blocks=10, token_budget=24, sink_tokens=2,
                               local_tokens=4, index_channels=8, index_bits=16), torch.float32),
    "small_mla": ([90, 200], 32, 1, 20, 96, 64, True,
                  dict(selection_block_size=16, num_blocks=5, token_budget=48, sink_tokens=4, local_tokens=16,
                       index_channels=32, index_bits=4), torch.bfloat16),
    # MLA's latent width (576 / 512) in bf16: the attention's wide-row launch plan.
    "small_mla_wide": ([90, 200, 37], 16, 1, 4, 576, 512, True,
                       dict(selection_block_size=16, num_blocks=5, token_budget=72, sink_tokens=4, local_tokens=16,
                            index_channels=32, index_bits=4), torch.bfloat16),
}


def _bench_mla_case(seq_lens, heads):
    """The MLA benchmark's settings scaled down: latent 576 / 512 on one kv head, blocks of 64, budget 512."""
    return (seq_lens, 64, 1, heads, 576, 512, True,
            dict(selection_block_size=64, num_blocks=16, token_budget=512, sink_tokens=64, local_tokens=64,
                 index_channels=128, index_bits=4), torch.bfloat16)


# The benchmark's settings and shapes scaled down (contexts and budgets / 8..16; heads and dims as run).
BENCH_SCALED = {
    "bench_qwen3_8b_scaled": ([4096, 3000, 4096], 64, 8, 4, 128, 128, False,
                              dict(selection_block_size=64, num_blocks=16, token_budget=512, sink_tokens=64,
                                   local_tokens=64, index_channels=32, index_bits=4), torch.bfloat16),
    "bench_qwen3_8b_scaled_b256": ([8192, 5000], 64, 8, 4, 128, 128, False,
                                   dict(selection_block_size=64, num_blocks=16, token_budget=256, sink_tokens=64,
                                        local_tokens=64, index_channels=32, index_bits=4), torch.bfloat16),
    "bench_mla_scaled": _bench_mla_case([4096, 2500], 16),
    # GLM-style MLA: 20 heads on the latent kv head (32 heads per program in the wide plans).
    "bench_glm_scaled": _bench_mla_case([4096, 2500, 777], 20),
    # DeepSeek-V3-style MLA: 128 heads (4 head blocks of 32 per kv head in the wide attention plan).
    "bench_dsv3_scaled": _bench_mla_case([4096, 777], 128),
}
CASES = dict(SMALL) if _INTERPRET else {**SMALL, **BENCH_SCALED}


def build(name, seed=0, basis=False):
    """A case on DEVICE: query, caches (garbage outside the sequences), shuffled table, index written
    by the reference from keys with a few heavy channels (so channel choice and quantisation matter);
    with `basis`, the index in the keys' principal directions (`index_basis="pca"`)."""
    seq_lens, cbs, Hkv, group, Dk, Dv, mla, kw, dtype = CASES[name]
    config = SparseAttentionConfig(**kw)
    gen = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    W = max(math.ceil(L / cbs) for L in seq_lens) + 1  # one spare column: tables are wider than needed
    num_cache_blocks = B * W + 2
    table = torch.randperm(num_cache_blocks, generator=gen)[: B * W].view(B, W).to(torch.int32)
    heavy = torch.ones(Dk)
    heavy[torch.randperm(Dk, generator=gen)[: max(1, Dk // 8)]] = 4.0
    key_cache = (torch.randn(num_cache_blocks, cbs, Hkv, Dk, generator=gen) * heavy).to(dtype)
    value_cache = key_cache[..., :Dv] if mla else torch.randn(num_cache_blocks, cbs, Hkv, Dv, generator=gen).to(dtype)
    query = (torch.randn(B, Hkv * group, Dk, generator=gen) * heavy).to(dtype)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    index = ref.allocate_index(num_cache_blocks, cbs, Hkv, Dk, config, dtype, "cpu")
    fill_summaries_with_junk(index, gen)  # junk to overwrite
    slots = []
    for b, L in enumerate(seq_lens):
        pos = torch.arange(L)
        slots.append(table[b, pos // cbs].long() * cbs + pos % cbs)
    slots = torch.cat(slots)
    flat = key_cache.view(-1, Hkv, Dk)[slots]
    ref.set_index_channels(index, ref.choose_index_channels(flat.float(), config.index_channels))
    if basis:
        config = config.with_(index_basis="pca")
        ref.set_index_basis(index, ref.choose_index_basis(flat.float()))
    ref.write_index(index, flat, slots, config)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    index = copy_index(index, to)
    key_cache = key_cache.to(DEVICE)
    value_cache = key_cache[..., :Dv] if mla else value_cache.to(DEVICE)
    return dict(query=query.to(DEVICE), key_cache=key_cache, value_cache=value_cache, block_table=table.to(DEVICE),
                seq_lens=seq.to(DEVICE), index=index, config=config, scale=1.0 / math.sqrt(Dk), dtype=dtype,
                flat_keys=flat, slots=slots)


def copy_index(index, move):
    """A `SparseIndex` whose tensors are `move(tensor)` (None stays None); same key dtype."""
    tensors = (index.block_min, index.block_max, index.block_scale, index.channel_ids, index.codes, index.scales)
    return ref.SparseIndex(*(None if t is None else move(t) for t in tensors), index.key_dtype,
                           None if index.basis is None else move(index.basis))


def assert_same_selection(got, want, ref_scores, candidates, tol):
    """`got`, `want`: (R, K) ids ascending, -1 padded (pads last). The selections must be valid, and
    equal as multisets of reference scores (so only near-ties may swap)."""
    got, want = got.cpu().long(), want.cpu().long()
    ref_scores, candidates = ref_scores.cpu(), candidates.cpu()
    assert got.shape == want.shape
    for r in range(got.shape[0]):
        g, w = got[r], want[r]
        gv, wv = g[g >= 0], w[w >= 0]
        assert (g[len(gv):] == -1).all(), f"row {r}: padding not last"
        assert len(gv) == len(wv), f"row {r}: {len(gv)} selected, reference {len(wv)}"
        assert (gv[1:] > gv[:-1]).all(), f"row {r}: not strictly ascending"
        if torch.equal(gv, wv):
            continue
        gi = (candidates[r].unsqueeze(0) == gv.unsqueeze(1)).float().argmax(1)
        wi = (candidates[r].unsqueeze(0) == wv.unsqueeze(1)).float().argmax(1)
        gs, ws = ref_scores[r][gi].sort().values, ref_scores[r][wi].sort().values
        span = ref_scores[r][torch.isfinite(ref_scores[r])].abs().max()
        assert torch.allclose(gs, ws, rtol=0, atol=float(tol * span)), f"row {r}: different selection"


def assert_same_summaries(gpu, want):
    """Triton's summaries equal the reference's bit for bit: int8 codes and float32 scales."""
    assert gpu.block_min.dtype == gpu.block_max.dtype == torch.int8 and gpu.block_scale.dtype == torch.float32
    assert torch.equal(gpu.block_scale.cpu(), want.block_scale)
    assert torch.equal(gpu.block_min.cpu(), want.block_min)
    assert torch.equal(gpu.block_max.cpu(), want.block_max)


@pytest.fixture(params=["one_pass", "claimed"])
def write_plan(request, monkeypatch):
    """Each index write test runs through both launch plans of `write_index_triton` at every call size:
    one pass (decode-sized calls) and the claim kernels (prefill-sized calls)."""
    monkeypatch.setattr(index_write, "ONE_PASS_MAX_TOKENS", 1 << 30 if request.param == "one_pass" else 0)
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_write_index_matches_reference(name, write_plan):
    c = build(name, seed=1)
    config, index = c["config"], c["index"]
    # Prefill-like call: shuffled tokens, padding slots, over a junk-filled index (fresh copy).
    fresh = copy_index(index, lambda t: t.cpu().clone())
    fill_summaries_with_junk(fresh, torch.Generator().manual_seed(5))
    gpu = copy_index(fresh, lambda t: t.to(DEVICE).clone())
    n = c["slots"].shape[0]
    perm = torch.randperm(n)
    slots = c["slots"][perm].clone()
    slots[torch.randperm(n)[: max(1, n // 50)]] = -1
    keys = c["flat_keys"][perm]
    ws = IndexWriteWorkspace(index.block_min.shape[0], index.block_min.shape[1], DEVICE)
    half = n // 2  # two calls: the second merges into summaries the first started
    for sl in (slice(0, half), slice(half, n)):
        ref.write_index(fresh, keys[sl], slots[sl], config)
        write_index_triton(gpu, keys[sl].to(DEVICE), slots[sl].to(DEVICE), config, ws)
    assert_same_summaries(gpu, fresh)
    if fresh.codes is not None:
        assert torch.equal(gpu.scales.cpu(), fresh.scales)
        assert torch.equal(gpu.codes.cpu(), fresh.codes)
    assert bool((ws.claim == torch.iinfo(torch.int32).max).all()), "claim buffer not released"  # or untouched
    # Decode-like call: one token per sequence, some starting a fresh selection block.
    seq_lens = c["seq_lens"].cpu()
    table = c["block_table"].cpu()
    cbs = c["key_cache"].shape[1]
    new_slots = (table[torch.arange(len(seq_lens)), seq_lens.long() // cbs].long() * cbs + seq_lens.long() % cbs)
    new_keys = torch.randn(len(seq_lens), *keys.shape[1:]).to(keys.dtype)
    ref.write_index(fresh, new_keys, new_slots, config)
    write_index_triton(gpu, new_keys.to(DEVICE), new_slots.to(DEVICE), config, ws)
    assert_same_summaries(gpu, fresh)


def test_write_index_takes_one_pass_up_to_its_limit():
    # The writer's own dispatch: calls of at most ONE_PASS_MAX_TOKENS tokens take the one-pass kernel (the
    # claim buffer untouched), one token more the claim kernels; both equal the reference, with padded slots
    # far below zero (their selection block would be negative) and many tokens of one selection block.
    S = 8
    config = SparseAttentionConfig(selection_block_size=S, num_blocks=2, token_budget=16, sink_tokens=0,
                                   local_tokens=0, index_channels=4, index_bits=4)
    limit = index_write.ONE_PASS_MAX_TOKENS
    gen = torch.Generator().manual_seed(21)
    want = ref.allocate_index(2 * limit // 16 + 2, 16, 2, 16, config, torch.float32, "cpu")
    fill_summaries_with_junk(want, gen)
    got = copy_index(want, lambda t: t.to(DEVICE).clone())
    ws = IndexWriteWorkspace(want.block_min.shape[0], want.block_min.shape[1], DEVICE)
    start = 3  # the first call starts mid-block: its first block merges into the junk summary
    for n, sentinel in ((limit, 7), (limit + 1, None)):
        slots = torch.arange(start, start + n)
        slots[torch.randperm(n, generator=gen)[:5]] = torch.tensor([-1, -3 * S - 1, -10**6, -S, -2])
        keys = torch.randn(n, 2, 16, generator=gen)
        if sentinel is not None:
            ws.claim.fill_(sentinel)
        ref.write_index(want, keys, slots, config)
        write_index_triton(got, keys.to(DEVICE), slots.to(DEVICE), config, ws)
        assert_same_summaries(got, want)
        assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)
        if sentinel is not None:  # one pass: the claim buffer is not used
            assert bool((ws.claim == sentinel).all())
            ws.claim.fill_(torch.iinfo(torch.int32).max)
        else:  # the claim kernels: every claim released
            assert bool((ws.claim == torch.iinfo(torch.int32).max).all())
        start += n


@pytest.mark.parametrize("Hkv, Dk, dtype", [(1, 576, torch.bfloat16), (3, 40, torch.float16)])
def test_write_index_summaries_odd_head_shapes(Hkv, Dk, dtype, write_plan):
    # MLA's key width (not a power of two) and an odd head count: the writer's (heads, channels) tiles
    # are padded, so the per-head scale must only see real channels. Prefill with a split block, then
    # decode tokens that merge without growing the scale and tokens that grow it.
    config = SparseAttentionConfig(selection_block_size=16, num_blocks=2, token_budget=32, sink_tokens=0,
                                   local_tokens=0, index_channels=8, index_bits=4)
    gen = torch.Generator().manual_seed(3)
    want = ref.allocate_index(3, 32, Hkv, Dk, config, dtype, "cpu")
    fill_summaries_with_junk(want, gen)
    got = copy_index(want, lambda t: t.to(DEVICE).clone())
    ws = IndexWriteWorkspace(3, 2, DEVICE)
    keys = (torch.randn(40, Hkv, Dk, generator=gen) * torch.rand(1, 1, Dk, generator=gen) * 3).to(dtype)
    slots = torch.cat([torch.arange(32, 56), torch.arange(64, 80)])  # blocks 1 (one and a half) and 2
    calls = [slice(0, 20), slice(20, 40)] + [slice(t, t + 1) for t in range(20, 24)]  # prefill, then decode
    for t, sl in enumerate(calls):
        k = keys[sl] * (1.0 if t < 4 else 4.0)  # the last decode tokens grow the scale
        ref.write_index(want, k, slots[sl], config)
        write_index_triton(got, k.to(DEVICE), slots[sl].to(DEVICE), config, ws)
        assert_same_summaries(got, want)
    assert bool(want.block_scale[1].gt(0).all() and want.block_scale[2, 0].gt(0).all())  # written blocks


@pytest.mark.parametrize("Hkv, Dk, split, dtype, bits", [(1, 576, 512, torch.bfloat16, 4),
                                                          (3, 40, 24, torch.float16, 8),
                                                          (2, 48, 47, torch.float32, 16)])
def test_write_index_with_a_key_tail_equals_the_whole_key(Hkv, Dk, split, dtype, bits, write_plan):
    # Keys held in two strided parts (MLA's kv_c_normed and k_pe): the same index as the joined key, with
    # index channels on both sides of the split, padded slots, and decode-sized calls in which later tokens
    # fold into an earlier token's selection block (the one-pass kernel's scan reads the tail too).
    config = SparseAttentionConfig(selection_block_size=8, num_blocks=2, token_budget=16, sink_tokens=0,
                                   local_tokens=0, index_channels=8, index_bits=bits)
    gen = torch.Generator().manual_seed(13)
    want = ref.allocate_index(4, 16, Hkv, Dk, config, dtype, "cpu")
    channels = torch.stack([torch.randperm(Dk, generator=gen)[:8] for _ in range(Hkv)])
    channels[:, :2] = torch.tensor([split - 1, split])  # both sides of the split, every head
    ref.set_index_channels(want, channels)
    fill_summaries_with_junk(want, gen)
    got = copy_index(want, lambda t: t.to(DEVICE).clone())
    ws = IndexWriteWorkspace(4, 2, DEVICE)
    keys = (torch.randn(40, Hkv, Dk, generator=gen) * torch.rand(1, 1, Dk, generator=gen) * 3).to(dtype)
    # The parts as strided views of separate buffers full of junk: the head inside wider rows, the tail
    # every other channel (so a misread offset or mask reads junk, not the neighbouring part).
    head_rows = torch.full((40, Hkv, Dk + 5), 1e4, dtype=dtype)
    head_rows[..., 5:5 + split] = keys[..., :split]
    tail_rows = torch.full((40, Hkv, 2 * (Dk - split) + 3), -1e4, dtype=dtype)
    tail_rows[..., 1:2 * (Dk - split):2] = keys[..., split:]
    head = head_rows.to(DEVICE)[..., 5:5 + split]
    tail = tail_rows.to(DEVICE)[..., 1:2 * (Dk - split):2]
    assert not head.is_contiguous() and tail.stride(-1) == 2
    slots = torch.cat([torch.arange(16, 36), torch.arange(40, 60)])
    slots[[3, 30]] = torch.tensor([-1, -1000])
    calls = [slice(0, 20), slice(20, 25), slice(25, 40)]  # `write_plan` picks the plan (claimed: joined first)
    for sl in calls:
        ref.write_index(want, keys[sl], slots[sl], config)
        write_index_triton(got, head[sl], slots[sl].to(DEVICE), config, ws, key_tail=tail[sl])
        assert_same_summaries(got, want)
        if want.codes is not None:
            assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)
    other_dtype = torch.float16 if dtype != torch.float16 else torch.float32
    with pytest.raises(ValueError, match="key_tail must be"):
        write_index_triton(got, head[:2], slots[:2].to(DEVICE), config, ws, key_tail=tail[:2].to(other_dtype))
    with pytest.raises(ValueError, match="with its tail"):
        write_index_triton(got, head[:2], slots[:2].to(DEVICE), config, ws, key_tail=tail[:2, :, :-1])


def test_write_index_with_a_key_tail_into_a_basis_equals_the_whole_key():
    # A pca index rotates the whole key, so the writer joins the parts first: the same index as the joined key
    # written by the same kernels (the rotation equals the reference's only up to float32 summation order).
    c = build("small_mla", seed=4, basis=True)
    config, index = c["config"].with_(index_basis="pca"), c["index"]
    keys, slots = c["flat_keys"][:40].to(DEVICE), c["slots"][:40].to(DEVICE)
    split = keys.shape[-1] - 7
    joined, apart = (copy_index(index, lambda t: t.to(DEVICE).clone()) for _ in range(2))
    for t in (joined, apart):
        fill_summaries_with_junk_on(t, seed=9)
    for sl in (slice(0, 30), slice(30, 31), slice(31, 40)):
        write_index_triton(joined, keys[sl], slots[sl], config)
        write_index_triton(apart, keys[sl, :, :split], slots[sl], config, key_tail=keys[sl, :, split:])
    for name in ("block_min", "block_max", "block_scale", "codes", "scales"):
        assert torch.equal(getattr(apart, name), getattr(joined, name)), name


@pytest.mark.parametrize("tail", [False, True], ids=["one_part", "key_tail"])
def test_warm_write_index_writes_nothing(tail, monkeypatch):
    # Every size class of call, each slot padded: the index, its junk summaries and the claim buffer stay as they
    # were (the warm-up only makes Triton compile the variants). A one-pass limit of 32 keeps the interpreter
    # quick: calls of 1, 15, 16, 31, 32 tokens in one pass, 33 and 48 through the claim kernels.
    monkeypatch.setattr(index_write, "ONE_PASS_MAX_TOKENS", 32)
    config = SparseAttentionConfig(selection_block_size=8, num_blocks=2, token_budget=16, sink_tokens=0,
                                   local_tokens=0, index_channels=8, index_bits=4)
    gen = torch.Generator().manual_seed(17)
    index = ref.allocate_index(4, 16, 2, 40, config, torch.float16, "cpu")
    fill_summaries_with_junk(index, gen)
    index.codes.copy_(torch.randint(0, 256, index.codes.shape, generator=gen, dtype=torch.uint8))
    index.scales.copy_(torch.rand(index.scales.shape, generator=gen))
    got = copy_index(index, lambda t: t.to(DEVICE).clone())
    ws = IndexWriteWorkspace(4, 2, DEVICE)
    key = torch.randn(3, 2, 40, generator=gen).half().to(DEVICE)
    warm_write_index(got, key[..., :24] if tail else key, config, ws, key_tail=key[..., 24:] if tail else None)
    for name in ("block_min", "block_max", "block_scale", "codes", "scales"):
        assert torch.equal(getattr(got, name).cpu(), getattr(index, name)), name
    assert bool((ws.claim == torch.iinfo(torch.int32).max).all())


@pytest.mark.parametrize("cache_dtype, last", [(torch.bfloat16, 53), (torch.float8_e4m3fn, 40)], ids=["bf16", "fp8"])
def test_warm_decode_attention_launches_every_batchs_plan_once_at_its_smallest_batch(monkeypatch, cache_dtype, last):
    # Qwen3-8B shapes at the paper's settings: the split count follows the batch, so batches up to 53 take
    # several variants (`last` the last one's first; an fp8 cache's counts differ). Each must be launched once, at
    # the smallest batch that takes it, all-padded, with the decode call's own query, cache and block-table layouts
    # and scales (strides are part of what Triton specialises on).
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    qkv = torch.zeros(40, (32 + 16) * 128, dtype=torch.bfloat16, device=DEVICE)
    query = qkv[:5, :32 * 128].view(5, 32, 128)  # a view of vLLM's fused qkv rows: row stride 6144
    block_table = torch.zeros(24, 33, dtype=torch.int32, device=DEVICE)[:5, :31]  # a view of a wider buffer
    key_cache = torch.zeros(4, 64, 8, 128, dtype=torch.bfloat16, device=DEVICE).to(cache_dtype)
    value_cache = torch.zeros(4, 64, 8, 128, dtype=torch.bfloat16, device=DEVICE).to(cache_dtype)
    scales = (torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE))
    calls = []

    def record(q, k, v, bt, positions, scale, kv_scales=None):
        calls.append((q.shape, q.stride(), q.dtype, bt.shape, bt.stride(), positions.clone(), k is key_cache,
                      v is value_cache, kv_scales is scales, sparse_attention.pdl_launch(q)))

    monkeypatch.setattr(sparse_decode, "sparse_attention_triton", record)
    batches = warm_decode_attention(query, key_cache, value_cache, block_table, config, 0.1, 53, kv_scales=scales)

    def plan(b):
        return sparse_attention.attention_plan(b, 32, 8, config.attended_tokens, 128, 128,
                                               kv_bytes=key_cache.element_size())

    assert batches == [c[0][0] for c in calls] and len(batches) > 2 and batches[-1] == last
    assert len({tuple(sorted(plan(b).items())) for b in batches}) == len(batches)
    for b in range(1, 54):
        first = min(c for c in range(1, b + 1) if plan(c) == plan(b))
        assert first in batches, b
    for q_shape, q_stride, dtype, bt_shape, bt_stride, positions, k_ok, v_ok, scales_ok, pdl in calls:
        b = q_shape[0]
        assert q_shape == (b, 32, 128) and q_stride == query.stride() and dtype == query.dtype
        assert k_ok and v_ok and scales_ok
        assert bt_shape == (b, 31) and bt_stride == block_table.stride()
        assert positions.shape == (b, 8, config.attended_tokens) and bool((positions == -1).all())
        assert pdl == sparse_attention.pdl_launch(query)


def test_warm_decode_attention_reads_only():
    # Launched for real (compiled on a GPU, the interpreter here): the caches and the block table stay as they were.
    config = SparseAttentionConfig(selection_block_size=8, num_blocks=2, token_budget=16, sink_tokens=0,
                                   local_tokens=0, index_channels=8, index_bits=4)
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(3, 16, 2, 40, generator=gen).to(torch.float16).to(DEVICE)
    before = cache.clone()
    block_table = torch.arange(6, dtype=torch.int32, device=DEVICE).view(3, 2) % 3
    query = torch.randn(3, 6, 40, generator=gen).to(torch.float16).to(DEVICE)
    batches = warm_decode_attention(query, cache, cache[..., :24], block_table, config, 0.2, 3)
    assert batches[0] == 1
    assert torch.equal(cache, before)
    assert torch.equal(block_table.cpu(), torch.arange(6, dtype=torch.int32).view(3, 2) % 3)


@pytest.mark.parametrize("subnormal", [False, True], ids=["normal", "subnormal"])
def test_write_index_summaries_bound_exactly(subnormal, write_plan):
    # Adversarial summary rows (values at, beside and a fraction of TOL off code * scale products, the
    # extreme channel, 1e-30 .. 1e30, negative zeros, scales one float32 step up; subnormal keys and
    # scales in their own case) written as keys of selection blocks: the writer must store the
    # reference's codes and scales bit for bit, bound the keys exactly, and give the same codes back
    # when a decode token inside the summary makes it requantise.
    mins, maxs = adversarial_summaries(torch.Generator().manual_seed(7), subnormal=subnormal)  # (R, D)
    if mins.shape[0] % 2:
        mins, maxs = torch.cat([mins, mins[:1]]), torch.cat([maxs, maxs[:1]])
    Hkv, D = 2, mins.shape[1]
    mins, maxs = mins.view(-1, Hkv, D), maxs.view(-1, Hkv, D)  # (G, Hkv, D): one selection block each
    G, S = mins.shape[0], 4
    config = SparseAttentionConfig(selection_block_size=S, num_blocks=2, token_budget=8, sink_tokens=0,
                                   local_tokens=0, index_channels=8, index_bits=16)
    want = ref.allocate_index(G // 2 + 1, 2 * S, Hkv, D, config, torch.float32, "cpu")  # 2 blocks a cache block
    fill_summaries_with_junk(want, torch.Generator().manual_seed(8))
    got = copy_index(want, lambda t: t.to(DEVICE).clone())
    ws = IndexWriteWorkspace(G // 2 + 1, 2, DEVICE)
    gen = torch.Generator().manual_seed(9)
    pick = lambda: torch.where(torch.rand(G, Hkv, D, generator=gen) < 0.5, mins, maxs)  # noqa: E731
    first = torch.stack([mins, maxs, pick()], dim=1).view(-1, Hkv, D)  # (3G, Hkv, D): offsets 0, 1, 2
    slots = (torch.arange(G) * S).repeat_interleave(3) + torch.arange(3).repeat(G)
    ref.write_index(want, first, slots, config)
    write_index_triton(got, first.to(DEVICE), slots.to(DEVICE), config, ws)
    assert_same_summaries(got, want)
    flat = lambda t: t.view(-1, *t.shape[2:])[:G]  # noqa: E731  (G, Hkv, ...)
    code_min, code_max, scale = flat(want.block_min), flat(want.block_max), flat(want.block_scale)
    assert_exact_summary(code_min.reshape(-1, D), code_max.reshape(-1, D), scale.reshape(-1),
                         mins.reshape(-1, D), maxs.reshape(-1, D))
    stored = [t.clone() for t in (want.block_min, want.block_max, want.block_scale)]
    inside = pick()  # (G, Hkv, D): offset 3, merges into the stored summary without growing it
    ref.write_index(want, inside, torch.arange(G) * S + 3, config)
    write_index_triton(got, inside.to(DEVICE), (torch.arange(G) * S + 3).to(DEVICE), config, ws)
    assert_same_summaries(got, want)
    for old, new in zip(stored, (want.block_min, want.block_max, want.block_scale)):
        assert torch.equal(old, new)


# (config.group_score, softmax_scale passed): the combination of a GQA group's heads, and its "lse"
# temperature both defaulted (1 / sqrt(Dk)) and given.
GROUP_RULES = [("lse", None), ("lse", 0.3), ("max", None)]


@pytest.mark.parametrize("group_score, softmax_scale", GROUP_RULES)
@pytest.mark.parametrize("name", list(CASES))
def test_block_selection_matches_reference(name, group_score, softmax_scale):
    c = build(name, seed=2)
    args = (c["query"], c["index"], c["block_table"], c["seq_lens"], c["config"].with_(group_score=group_score))
    want_scores = ref.score_blocks(*args, softmax_scale)
    n_sel = want_scores.shape[-1]
    got_scores = block_scores_triton(*args, n_sel, softmax_scale=softmax_scale)
    finite = torch.isfinite(want_scores)
    assert torch.equal(finite, torch.isfinite(got_scores))
    span = want_scores[finite].abs().max()
    torch.testing.assert_close(got_scores[finite], want_scores[finite], rtol=0,
                               atol=float(SCORE_TOL[c["dtype"]] * span))
    got = select_blocks_triton(*args, softmax_scale=softmax_scale)
    want = ref.select_blocks(*args, softmax_scale)
    B, Hkv, _ = want.shape
    ids = torch.arange(n_sel).expand(B * Hkv, n_sel)
    assert_same_selection(got.view(B * Hkv, -1), want.view(B * Hkv, -1), want_scores.view(B * Hkv, -1), ids,
                          SCORE_TOL[c["dtype"]])


@pytest.mark.parametrize("weight", [0.5, 0.0])
@pytest.mark.parametrize("name", list(CASES))
def test_block_selection_with_bound_weight_matches_reference(name, weight):
    # The blended score adds a third dot (q with the summed min and max codes) to the scorer.
    c = build(name, seed=4)
    args = (c["query"], c["index"], c["block_table"], c["seq_lens"], c["config"].with_(block_bound_weight=weight))
    want_scores = ref.score_blocks(*args)
    n_sel = want_scores.shape[-1]
    got_scores = block_scores_triton(*args, n_sel)
    finite = torch.isfinite(want_scores)
    assert torch.equal(finite, torch.isfinite(got_scores))
    span = want_scores[finite].abs().max()
    torch.testing.assert_close(got_scores[finite], want_scores[finite], rtol=0,
                               atol=float(SCORE_TOL[c["dtype"]] * span))
    B, Hkv, _ = want_scores.shape
    got = select_blocks_triton(*args)
    want = ref.select_blocks(*args)
    ids = torch.arange(n_sel).expand(B * Hkv, n_sel)
    assert_same_selection(got.view(B * Hkv, -1), want.view(B * Hkv, -1), want_scores.view(B * Hkv, -1), ids,
                          SCORE_TOL[c["dtype"]])


@pytest.mark.parametrize("name", ["small_gqa_odd_4bit", "small_mla_wide"])  # the shipped and the wide-key tile
@pytest.mark.parametrize("local_tokens", [8, 7])  # 7: what a lagged block stage ranks with
def test_block_scores_of_tiles_past_the_sequence(monkeypatch, name, local_tokens):
    # vLLM's block table is as wide as the longest context the model allows and its batch is padded
    # with empty rows: tiles that start past a row's candidates write -inf without scoring. Tiles of
    # 128 tokens over a table 40 columns wider than needed: row 0 padded (seq_len 0), row 2 with one
    # candidate in its second tile, that tile's first token, and the case's other rows as built.
    c = build(name, seed=7)
    tile = 128 // c["config"].selection_block_size
    monkeypatch.setattr(block_select, "BLOCK_SCORE_TILE", tile)
    monkeypatch.setattr(block_select, "BLOCK_SCORE_WIDE_TILE", tile)
    q, index = c["query"], c["index"]
    config = c["config"].with_(local_tokens=local_tokens)
    table = c["block_table"]
    wide = torch.cat([table, table[:, :1].expand(-1, 40)], dim=1).contiguous()
    seq = c["seq_lens"].clone()
    seq[0] = 0
    seq[2] = 128 + local_tokens + 1  # one candidate in the second tile: its first position, 128
    want = ref.score_blocks(q, index, wide, seq, config)
    n_sel = want.shape[-1]
    assert n_sel // tile >= 4
    got = block_scores_triton(q, index, wide, seq, config, n_sel)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and not finite[0].any() and finite[2, :, tile].all()
    span = want[finite].abs().max()
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=float(SCORE_TOL[c["dtype"]] * span))


@pytest.mark.parametrize("group_score, softmax_scale", GROUP_RULES)
@pytest.mark.parametrize("name", list(CASES))
def test_token_selection_matches_reference(name, group_score, softmax_scale):
    c = build(name, seed=3)
    q, index, kc, bt, sl = c["query"], c["index"], c["key_cache"], c["block_table"], c["seq_lens"]
    config = c["config"].with_(group_score=group_score)
    block_ids = ref.select_blocks(q, index, bt, sl, config, softmax_scale)
    want_pos, want_scores = ref.score_tokens(q, index, kc, bt, sl, block_ids, config, softmax_scale)
    got_scores = token_scores_triton(q, index, kc, bt, sl, block_ids, config, softmax_scale=softmax_scale)
    finite = torch.isfinite(want_scores)
    assert torch.equal(finite, torch.isfinite(got_scores))
    span = want_scores[finite].abs().max()
    torch.testing.assert_close(got_scores[finite], want_scores[finite], rtol=0,
                               atol=float(SCORE_TOL[c["dtype"]] * span))
    got = select_tokens_triton(q, index, kc, bt, sl, block_ids, config, softmax_scale=softmax_scale)
    want = ref.select_tokens(q, index, kc, bt, sl, block_ids, config, softmax_scale)
    B, Hkv, _ = want.shape
    assert_same_selection(got.view(B * Hkv, -1), want.view(B * Hkv, -1), want_scores.view(B * Hkv, -1),
                          want_pos.view(B * Hkv, -1), SCORE_TOL[c["dtype"]])


@pytest.mark.parametrize("name", [n for n in CASES if word_score_heads(SparseAttentionConfig(**CASES[n][7]), CASES[n][3])])
def test_block_scorer_writes_the_word_path_query(name):
    # The decode step has the block scorer write the token stage's query on the index channels; it
    # must equal build_index_query, and token scores from it must equal the dot path's.
    c = build(name, seed=5)
    q, index, kc, bt, sl, config = c["query"], c["index"], c["key_cache"], c["block_table"], c["seq_lens"], c["config"]
    B, Hq, _ = q.shape
    Hkv = kc.shape[2]
    heads = word_score_heads(config, Hq // Hkv)
    iq = torch.full((B, Hkv, config.index_channels, heads), float("nan"), device=DEVICE)
    n_sel = bt.shape[1] * kc.shape[1] // config.selection_block_size
    block_scores_triton(q, index, bt, sl, config, n_sel, index_query=iq)
    want = build_index_query(q, index.channel_ids, config.index_bits, heads)
    assert torch.equal(iq, want)
    assert (iq[..., Hq // Hkv:] == 0).all()
    block_ids = ref.select_blocks(q, index, bt, sl, config)
    words = token_scores_triton(q, index, kc, bt, sl, block_ids, config, index_query=iq)
    # The pipelined step's scorer writes the index query itself: the same buffer, bit-equal scores.
    own = torch.full_like(iq, float("nan"))
    written = token_scores_triton(q, index, kc, bt, sl, block_ids, config, index_query=own, write_index_query=True)
    assert torch.equal(own, want) and torch.equal(written, words)
    with pytest.raises(ValueError, match="write_index_query=True needs the index_query buffer"):
        token_scores_triton(q, index, kc, bt, sl, block_ids, config, write_index_query=True)
    # The dot path: the same codes through a non-contiguous copy (a channel stride of 2 bytes).
    wide = torch.zeros(*index.codes.shape[:3], 2 * index.codes.shape[3], dtype=torch.uint8, device=DEVICE)
    wide[..., ::2] = index.codes
    dot_index = ref.SparseIndex(index.block_min, index.block_max, index.block_scale, index.channel_ids,
                                wide[..., ::2], index.scales, index.key_dtype)
    dots = token_scores_triton(q, dot_index, kc, bt, sl, block_ids, config)
    finite = torch.isfinite(dots)
    assert torch.equal(finite, torch.isfinite(words))
    span = dots[finite].abs().max()
    torch.testing.assert_close(words[finite], dots[finite], rtol=0, atol=float(SCORE_TOL[c["dtype"]] * span))
    with pytest.raises(ValueError, match="index_query"):
        token_scores_triton(q, index, kc, bt, sl, block_ids, config, index_query=iq[..., :1])


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_attention_matches_reference(name):
    c = build(name, seed=4)
    q, kc, vc, bt, sl, config = c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["config"]
    positions = ref.exact_topk_positions(q, kc, bt, sl, config)
    # Shuffle the slots and drop some: attention must not depend on order or padding placement.
    positions = positions[..., torch.randperm(positions.shape[-1], device=positions.device)]
    positions[..., ::7] = -1
    positions = positions.contiguous()
    want = ref.sparse_attention(q, kc, vc, bt, positions, c["scale"])
    got = sparse_attention_triton(q, kc, vc, bt, positions, c["scale"])
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = OUT_TOL[c["dtype"]]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # Every position of the table (dense) too, where split-K has the most splits.
    T = bt.shape[1] * kc.shape[1]
    every = torch.arange(T, device=q.device, dtype=torch.int32).expand(q.shape[0], kc.shape[2], T)
    every = torch.where(every < sl.view(-1, 1, 1), every, -1).contiguous()
    torch.testing.assert_close(sparse_attention_triton(q, kc, vc, bt, every, c["scale"]).float(),
                               ref.dense_decode_attention(q, kc, vc, bt, sl, c["scale"]).float(), rtol=tol, atol=tol)


def test_sparse_attention_rejects_a_workspace_of_other_launch_settings(monkeypatch):
    # The split count follows the launch settings: a workspace sized for fewer splits would be written
    # past its end.
    c = build("small_gqa_odd_4bit", seed=5)
    q, kc, vc, bt, sl, config = c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["config"]
    positions = ref.exact_topk_positions(q, kc, bt, sl, config).contiguous()
    B, Hq, Dv = q.shape[0], q.shape[1], vc.shape[3]
    plan = sparse_attention.attention_plan(B, Hq, kc.shape[2], positions.shape[2], q.shape[2], Dv)
    ws = sparse_attention.AttentionWorkspace(B, Hq, plan["NUM_SPLITS"], Dv, q.device)
    want = sparse_attention_triton(q, kc, vc, bt, positions, c["scale"], workspace=ws)
    torch.testing.assert_close(want, sparse_attention_triton(q, kc, vc, bt, positions, c["scale"]), rtol=0, atol=0)
    monkeypatch.setattr(sparse_attention, "ATTN_BLOCK_N", sparse_attention.ATTN_BLOCK_N // 2)
    if sparse_attention.attention_plan(B, Hq, kc.shape[2], positions.shape[2], q.shape[2], Dv)["NUM_SPLITS"] \
            == plan["NUM_SPLITS"]:
        pytest.fail("the test needs launch settings that change the split count")
    with pytest.raises(ValueError, match="workspace holds .* split buffers; this launch needs"):
        sparse_attention_triton(q, kc, vc, bt, positions, c["scale"], workspace=ws)


def random_position_lists(B, Hkv, G, D, cbs, W, P, seed):
    """float32 query and paged K / V on DEVICE (a shuffled table of W blocks of `cbs` per sequence, one
    block spare) and P distinct random positions per (sequence, kv head), int64 on the CPU for the caller
    to pad."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(B * W + 1, generator=gen)[: B * W].view(B, W).to(torch.int32).to(DEVICE)
    kc = torch.randn(B * W + 1, cbs, Hkv, D, generator=gen).to(DEVICE)
    vc = torch.randn(B * W + 1, cbs, Hkv, D, generator=gen).to(DEVICE)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE)
    positions = torch.stack([torch.randperm(W * cbs, generator=gen)[:P] for _ in range(B * Hkv)]).view(B, Hkv, P)
    return q, kc, vc, table, positions


def test_long_split_count_fills_whole_waves_as_measured():
    # Qwen3-8B shapes at budget 2048 (2,176 positions, 68 tiles): the split count that was fastest in the H200
    # sweep of 1-8 forced splits at each batch (benchmarks/RESULTS.md, 2026-11-27), where about 3 programs per SM
    # rounded up took 3 splits at B=24 (576 programs: a second wave of 48), 10% slower than 5.
    # The H100's sweep of the same shapes (2026-11-27) found the same counts fastest on a bf16 cache. On an fp8
    # cache fewer programs fit an SM: at B = 8-32 the fastest counts are those of 3 slots per SM (at 40-56 the count
    # of 3 slots is within 2.4% of the fastest, not it).
    fastest = {8: 8, 12: 5, 16: 4, 20: 3, 24: 5, 28: 2, 32: 2, 40: 3, 48: 4}
    fastest_fp8 = {8: 6, 12: 4, 16: 3, 20: 2, 24: 2, 28: 5, 32: 3}
    for kv_bytes, table in ((None, fastest), (2, fastest), (1, fastest_fp8)):
        for batch, splits in table.items():
            plan = sparse_attention.attention_plan(batch, 32, 8, 2176, 128, 128, kv_bytes=kv_bytes)
            assert plan["num_stages"] == sparse_attention.ATTN_LONG_SPLIT_STAGES
            assert plan["NUM_SPLITS"] == splits, (batch, kv_bytes)
    # Other program shapes fit other numbers of programs per SM (registers bound them). The H100's sweeps of forced
    # splits (benchmarks/results/hd64_split_2026-11-27/): the fastest counts, by (q heads, kv heads, head dim, kv
    # bytes), at points where the table's count was the fastest measured (16 q heads per program: head dim 64;
    # 32, 64 and 128 per program: groups of 32, multi-query with 32, 64 and 128 q heads).
    fastest_by_shape = {
        (32, 8, 64, 2): {4: 17, 5: 17, 6: 14, 8: 12, 10: 9, 12: 8, 16: 6, 20: 4, 24: 4, 32: 3, 40: 2, 48: 2, 56: 5},
        (32, 8, 64, 1): {4: 17, 5: 14, 6: 12, 8: 10, 10: 8, 12: 6, 16: 5, 20: 4, 24: 3, 32: 5, 40: 2, 48: 5, 56: 4},
        (64, 2, 128, 2): {16: 14, 24: 10, 32: 8, 64: 4},
        (64, 2, 128, 1): {16: 8, 32: 4, 64: 2},
        (64, 2, 64, 2): {16: 17, 24: 14, 32: 12, 48: 8, 64: 6},
        (64, 2, 64, 1): {16: 14, 24: 10, 32: 8, 64: 4},
        (32, 1, 128, 2): {32: 14, 48: 10, 64: 8},
        (32, 1, 128, 1): {32: 8, 64: 4},
        (64, 1, 128, 2): {32: 8, 48: 5, 64: 4},
        (64, 1, 128, 1): {48: 5, 64: 4, 96: 5},
        (64, 1, 64, 2): {48: 12, 64: 10, 96: 6},
        (64, 1, 64, 1): {48: 12, 64: 10, 96: 6},
        (128, 1, 128, 2): {48: 5, 64: 2},
        (128, 1, 128, 1): {32: 8, 48: 5, 64: 4},
        (128, 1, 64, 2): {32: 8, 48: 5, 64: 4, 96: 5},
        (128, 1, 64, 1): {32: 12, 48: 8, 64: 6, 96: 4},
    }
    for (hq, hkv, d, kv_bytes), table in fastest_by_shape.items():
        for batch, splits in table.items():
            plan = sparse_attention.attention_plan(batch, hq, hkv, 2176, d, d, kv_bytes=kv_bytes)
            assert plan["NUM_SPLITS"] == splits, (hq, hkv, d, kv_bytes, batch)
    # Unmeasured programs keep about 3 per SM: head dim 32, 256 q heads per program, keys wider than values (also
    # past 128 channels, which the kernel reads in chunks of 128), and float32 queries (the table holds 16-bit
    # queries' registers).
    for hq, hkv, dk, dv, batch, query_bytes in ((32, 8, 32, 32, 8, 2), (32, 8, 32, 32, 24, 2), (256, 1, 64, 64, 64, 2),
                                                (32, 8, 128, 64, 8, 2), (32, 8, 192, 128, 24, 2),
                                                (32, 8, 128, 128, 24, 4), (32, 8, 64, 64, 8, 4)):
        plan = sparse_attention.attention_plan(batch, hq, hkv, 2176, dk, dv, query_bytes=query_bytes)
        programs = batch * hkv * plan["head_blocks"]
        want = -(-sparse_attention.ATTN_LONG_SPLIT_PROGRAMS_PER_SM * 132 // programs)
        assert plan["num_stages"] == sparse_attention.ATTN_LONG_SPLIT_STAGES
        assert plan["NUM_SPLITS"] == -(-68 // -(-68 // want)), (hq, hkv, dk, dv, batch, query_bytes)
    # Every count keeps its least tiles per split, and lists split while two splits fit one wave.
    for programs in range(32, 600):
        for tiles in (4, 5, 17, 68, 132):
            splits = sparse_attention.long_split_count(programs, tiles, 528, 4, 2)
            assert tiles // splits >= 4 or splits == 1
            if programs * 2 <= 528 and tiles >= 2 * 4:
                assert splits > 1, (programs, tiles)


def test_attention_launch_takes_the_caches_split_count(monkeypatch):
    # The launch plans from the cache it reads (an fp8 cache's split kernel fits 3 programs per SM, not 4), as the
    # workspace sized for that cache does: Qwen3-8B shapes at budget 2048, B=24 (5 splits on bf16, 2 on fp8).
    B, Hq, Hkv, D, P = 24, 32, 8, 128, 2176
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs["NUM_SPLITS"]))

    monkeypatch.setattr(sparse_attention, "_sparse_attn_split_kernel", Recorder())
    monkeypatch.setattr(sparse_attention, "_sparse_attn_merge_kernel", Recorder())
    query = torch.zeros(B, Hq, D, dtype=torch.bfloat16, device=DEVICE)
    table = torch.zeros(B, 1, dtype=torch.int32, device=DEVICE)
    positions = torch.full((B, Hkv, P), -1, dtype=torch.int32, device=DEVICE)
    scales = (torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE))
    for cache_dtype, kv_dtype, splits in ((torch.bfloat16, None, 5), (torch.float8_e4m3fn, torch.uint8, 2)):
        cache = torch.zeros(1, 16, Hkv, D, device=DEVICE).to(cache_dtype)
        ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, 1, 16, config, torch.bfloat16, DEVICE, kv_dtype=kv_dtype)
        launches.clear()
        sparse_attention.sparse_attention_triton(query, cache, cache, table, positions, 0.1, workspace=ws.attention,
                                                 kv_scales=scales if kv_dtype else None)
        (split_grid, split_n), (merge_grid, merge_n) = launches
        assert split_grid == (B * Hkv, 1, splits) and merge_grid == (B * Hq,) and split_n == merge_n == splits
        assert ws.attention.acc.shape[2] == splits


def test_long_split_plan_for_many_groups_equals_the_reference(monkeypatch):
    # At least ATTN_LONG_SPLIT_MIN_GROUPS (sequence, kv head, head block) groups take fewer, longer splits
    # with a deeper pipeline; fewer groups keep the short splits. Both equal the reference, with padding
    # and a row with nothing to attend.
    B, Hkv, G, D, cbs, W, P = 4, 8, 2, 32, 16, 40, 600
    q, kc, vc, table, positions = random_position_lists(B, Hkv, G, D, cbs, W, P, seed=12)
    positions[..., ::3] = -1
    positions[2] = -1
    positions = positions.to(torch.int32).contiguous().to(DEVICE)
    want = ref.sparse_attention(q, kc, vc, table, positions, 0.2)
    monkeypatch.setattr(sparse_attention, "ATTN_LONG_SPLIT_MIN_GROUPS", B * Hkv)
    monkeypatch.setattr(sparse_attention, "ATTN_LONG_SPLIT_MIN_TILES", 1)
    long_plan = sparse_attention.attention_plan(B, Hkv * G, Hkv, P, D, D)
    short_plan = sparse_attention.attention_plan(B - 1, Hkv * G, Hkv, P, D, D)
    assert long_plan["num_stages"] == sparse_attention.ATTN_LONG_SPLIT_STAGES
    assert short_plan["num_stages"] == sparse_attention.ATTN_NUM_STAGES
    assert 1 < long_plan["NUM_SPLITS"] < short_plan["NUM_SPLITS"]
    # Lists too short for long splits of ATTN_LONG_SPLIT_MIN_TILES tiles keep the short ones.
    with monkeypatch.context() as m:
        m.setattr(sparse_attention, "ATTN_LONG_SPLIT_MIN_TILES", 8)
        few_tiles = sparse_attention.attention_plan(B, Hkv * G, Hkv, P, D, D)
        m.setattr(sparse_attention, "ATTN_LONG_SPLITS", False)
        assert few_tiles == sparse_attention.attention_plan(B, Hkv * G, Hkv, P, D, D) != long_plan
    with monkeypatch.context() as m:  # the environment's switch
        m.setenv("ASYNCTLS_ATTN_LONG_SPLITS", "0")
        assert sparse_attention.attention_plan(B, Hkv * G, Hkv, P, D, D) == few_tiles
    tol = OUT_TOL[torch.float32]
    torch.testing.assert_close(sparse_attention_triton(q, kc, vc, table, positions, 0.2), want, rtol=tol, atol=tol)
    torch.testing.assert_close(sparse_attention_triton(q[:-1], kc, vc, table[:-1], positions[:-1], 0.2), want[:-1],
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk_elements", [2 * 32, 4 * 32, 3 * 32])  # chunks of 2, 4 and (rounded down) 2 splits
def test_many_splits_merge_in_chunks_and_equal_the_reference(monkeypatch, chunk_elements):
    # Past MERGE_TILE_ELEMENTS accumulator values a head's splits merge in chunks (two passes), with
    # padding, a head with nothing to attend, and splits of one tile each (short ones for one group).
    B, Hkv, G, D, cbs, W, P = 2, 2, 2, 32, 16, 24, 270  # 9 splits of one 32-row tile
    q, kc, vc, table, positions = random_position_lists(B, Hkv, G, D, cbs, W, P, seed=13)
    positions[..., ::5] = -1
    positions[1, 0] = -1
    positions = positions.to(torch.int32).contiguous().to(DEVICE)
    want = ref.sparse_attention(q, kc, vc, table, positions, 0.2)
    plan = sparse_attention.attention_plan(B, Hkv * G, Hkv, P, D, D)
    monkeypatch.setattr(sparse_attention, "MERGE_TILE_ELEMENTS", 2 * 32)
    monkeypatch.setattr(sparse_attention, "MERGE_CHUNK_ELEMENTS", chunk_elements)
    merge = sparse_attention.merge_plan(plan["NUM_SPLITS"], D)
    assert merge["CHUNKS"] >= 2 and merge["BLOCK_S"] * merge["CHUNKS"] >= plan["NUM_SPLITS"], (plan, merge)
    assert merge["BLOCK_S"] & (merge["BLOCK_S"] - 1) == 0 and plan["NUM_SPLITS"] % merge["BLOCK_S"]  # padded last
    got = sparse_attention_triton(q, kc, vc, table, positions, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got[1, :G].any()  # kv head 0 of sequence 1 attends nothing: its q heads are zero
    monkeypatch.undo()
    assert sparse_attention.merge_plan(34, 512) == dict(BLOCK_S=64, CHUNKS=1)  # MLA, budget 2048: one tile
    assert sparse_attention.merge_plan(130, 512) == dict(BLOCK_S=32, CHUNKS=5)  # MLA, budget 8K at B=1


def test_wide_value_rows_take_the_wide_plan(monkeypatch):
    # MLA's latent rows (value 512 wide) with up to 4 head blocks per kv head (16, GLM's 20, DeepSeek-V3's 128
    # heads) and at most 128 (sequence, head block) groups where the long splits would apply: one 64-row tile
    # per split, 4 warps, a 4-stage pipeline; with more groups splits of 4 such tiles (16 heads on an fp8 cache:
    # 1.81x and 1.59x faster at 136 and 256 groups than the long splits that applied there before) while their
    # split buffers stay within ATTN_WIDE_MAX_SPLIT_BYTES. Exactness of this plan is
    # checked by every test over the `small_mla_wide` case, by the several-head-block test below and, compiled,
    # over `bench_glm_scaled` and `bench_dsv3_scaled`.
    sa = sparse_attention
    for B, P, H in ((1, 2176, 16), (16, 2176, 16), (32, 2176, 16), (8, 300, 16), (16, 37, 16), (16, 2176, 20),
                    (1, 2176, 32), (1, 2176, 128), (8, 2176, 128), (32, 2176, 128), (128, 2176, 16),
                    (64, 2176, 20), (256, 37, 16)):
        plan = sa.attention_plan(B, H, 1, P, 576, 512)
        assert (plan["BLOCK_N"], plan["SPLIT_LEN"], plan["num_warps"], plan["num_stages"]) == (
            sa.ATTN_WIDE_BLOCK_N, sa.ATTN_WIDE_BLOCK_N, sa.ATTN_WIDE_NUM_WARPS, sa.ATTN_WIDE_STAGES), (B, P, H)
        assert plan["NUM_SPLITS"] == math.ceil(P / sa.ATTN_WIDE_BLOCK_N)
    for B, H in ((48, 128), (136, 16), (256, 16), (160, 20)):  # more than 128 groups: 4 tiles per split
        many_groups = sa.attention_plan(B, H, 1, 2176, 576, 512)
        assert (many_groups["BLOCK_N"], many_groups["SPLIT_LEN"], many_groups["NUM_SPLITS"],
                many_groups["num_stages"]) == (64, 4 * 64, 9, sa.ATTN_WIDE_STAGES), (B, H)
        with monkeypatch.context() as m:  # ... or, with ATTN_WIDE_MANY_GROUPS_SPLIT_TILES None, the long splits
            m.setattr(sa, "ATTN_WIDE_MANY_GROUPS_SPLIT_TILES", None)
            long_plan = sa.attention_plan(B, H, 1, 2176, 576, 512)
            assert long_plan["num_stages"] == sa.ATTN_LONG_SPLIT_STAGES and long_plan["BLOCK_N"] == 32, (B, H)
    for B, H, wide in ((1024, 16, True), (1025, 16, False), (819, 20, True), (820, 20, False), (128, 128, True),
                       (129, 128, False)):  # the split buffers' bytes cap (288 MiB): past it the long splits
        assert (sa.attention_plan(B, H, 1, 2176, 576, 512)["BLOCK_N"] == sa.ATTN_WIDE_BLOCK_N) == wide, (B, H)
    short = sa.attention_plan(400, 16, 1, 100, 576, 512)  # many groups, a list of 2 tiles: one split of both
    assert (short["SPLIT_LEN"], short["NUM_SPLITS"]) == (2 * sa.ATTN_WIDE_BLOCK_N, 1)
    with monkeypatch.context() as m:
        m.setattr(sa, "ATTN_WIDE_MANY_GROUPS_SPLIT_TILES", 0)
        with pytest.raises(ValueError, match=r"SPLIT_TILES=0; allowed: a tile count >= 1 or None"):
            sa.attention_plan(136, 16, 1, 2176, 576, 512)
    assert sa.attention_plan(1, 256, 1, 2176, 576, 512)["BLOCK_N"] == 32  # 8 head blocks: not measured
    with monkeypatch.context() as m:  # the long splits off: only the split buffers' bytes bound the wide plan
        m.setenv("ASYNCTLS_ATTN_LONG_SPLITS", "0")
        assert sa.attention_plan(32, 128, 1, 2176, 576, 512)["BLOCK_N"] == sa.ATTN_WIDE_BLOCK_N  # 285 MB
        assert sa.attention_plan(64, 128, 1, 2176, 576, 512)["BLOCK_N"] == 32  # 570 MB of split buffers
        assert sa.attention_plan(1, 16, 1, 8 * 2176, 576, 512)["BLOCK_N"] == sa.ATTN_WIDE_BLOCK_N
    assert sa.attention_plan(8, 32, 8, 2176, 128, 128)["BLOCK_N"] == sa.ATTN_BLOCK_N  # GQA unchanged
    assert sa.attention_plan(8, 16, 4, 2176, 256, 256)["BLOCK_N"] == 32  # head dim 256: not measured, unchanged
    assert sa.attention_plan(16, 16, 1, 2176, 576, 512, query_bytes=4)["BLOCK_N"] == 32  # float32: unchanged
    assert sa.attention_plan(16, 16, 1, 2176, 320, 300)["BLOCK_N"] == 32  # 300 channels (padded to 512)
    monkeypatch.setattr(sa, "ATTN_WIDE_BLOCK_N", 32)
    assert sa.attention_plan(16, 16, 1, 2176, 576, 512)["NUM_SPLITS"] == 68


@pytest.mark.parametrize("kv_fp8", [False, True])
def test_wide_plan_with_several_tiles_per_split_equals_the_reference(monkeypatch, kv_fp8):
    # The wide plan past ATTN_WIDE_LONG_MAX_GROUPS groups (lowered here to reach it with 3 sequences): splits of
    # 4 tiles of 64 rows, the last split partly padded (300 positions: 256 + 44), padding inside the lists, one
    # list shorter than a tile; 16 heads on a 576 / 512 latent row (MLA's V is a view of K), bf16 or fp8.
    sa = sparse_attention
    monkeypatch.setattr(sa, "ATTN_WIDE_LONG_MAX_GROUPS", 2)
    monkeypatch.setattr(sa, "ATTN_LONG_SPLIT_MIN_GROUPS", 1)
    monkeypatch.setattr(sa, "ATTN_LONG_SPLIT_PROGRAMS_PER_SM", 0)  # long splits however few tiles the lists hold
    B, Hkv, G, cbs, W, P = 3, 1, 16, 16, 24, 300
    q, kc, _, table, positions = random_position_lists(B, Hkv, G, 576, cbs, W, P, seed=21)
    q, kc = q.to(torch.bfloat16), kc.to(torch.bfloat16)
    positions[..., ::5] = -1
    positions[2, 0, 40:] = -1
    positions = positions.to(torch.int32).contiguous().to(DEVICE)
    plan = sa.attention_plan(B, Hkv * G, Hkv, P, 576, 512, kv_bytes=1 if kv_fp8 else 2)
    assert (plan["BLOCK_N"], plan["SPLIT_LEN"], plan["NUM_SPLITS"]) == (64, 256, 2), plan
    scales = None
    if kv_fp8:
        scales = (torch.tensor([0.5], device=DEVICE), torch.tensor([0.5], device=DEVICE))
        kc = (kc.float() / 0.5).to(torch.float8_e4m3fn)
    want_kc = kc.float() * 0.5 if kv_fp8 else kc
    want = ref.sparse_attention(q.float(), want_kc.float(), want_kc[..., :512].float(), table, positions, 0.05)
    got = sparse_attention_triton(q, kc, kc[..., :512], table, positions, 0.05, kv_scales=scales)
    tol = OUT_TOL[torch.bfloat16]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_wide_plan_over_several_head_blocks_equals_the_reference():
    # More heads on the latent kv head than one program holds (40: two head blocks of 32, as DeepSeek-V3's
    # 128 make four), bf16 rows 512 wide: the wide plan equals the reference, with padding and a short list.
    B, Hkv, G, D, cbs, W, P = 2, 1, 40, 512, 16, 6, 70
    q, kc, vc, table, positions = random_position_lists(B, Hkv, G, D, cbs, W, P, seed=14)
    q, kc, vc = (t.to(torch.bfloat16) for t in (q, kc, vc))
    positions[..., ::7] = -1
    positions[1, 0, 20:] = -1
    positions = positions.to(torch.int32).contiguous().to(DEVICE)
    plan = sparse_attention.attention_plan(B, Hkv * G, Hkv, P, D, D)
    assert plan["head_blocks"] == 2 and plan["BLOCK_N"] == sparse_attention.ATTN_WIDE_BLOCK_N, plan
    want = ref.sparse_attention(q, kc, vc, table, positions, 0.05)
    got = sparse_attention_triton(q, kc, vc, table, positions, 0.05)
    tol = OUT_TOL[torch.bfloat16]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_wide_keys_take_the_block_scorers_deep_pipeline():
    # MLA's latent + rope keys (576 channels) with up to 32 heads per program (DeepSeek-V2-Lite's 16, GLM's
    # 20) and 16-bit queries: 64 blocks per program, a 4-stage pipeline over the key chunks; GQA, float32
    # queries and 128-head MLA keep their tiles. Exactness of this plan is checked by every block-stage test
    # over the `small_mla_wide` case (and, compiled, `bench_glm_scaled`).
    bs = block_select
    for group in (16, 20):
        wide = bs.block_score_plan(group, 576)
        assert (wide["BLOCK_J"], wide["num_stages"], wide["BLOCK_DK"]) == (
            bs.BLOCK_SCORE_WIDE_TILE, bs.BLOCK_SCORE_WIDE_STAGES, bs.BLOCK_SCORE_DK)
    assert bs.block_score_plan(4, 128) == dict(BLOCK_H=16, BLOCK_J=bs.BLOCK_SCORE_TILE, BLOCK_DK=bs.BLOCK_SCORE_DK,
                                               num_warps=bs.BLOCK_SCORE_WARPS, num_stages=bs.BLOCK_SCORE_STAGES)
    for shape in ((16, 576, 4), (16, 288, 2)):
        assert bs.block_score_plan(*shape)["BLOCK_J"] == bs.BLOCK_SCORE_TILE, shape
    many = bs.block_score_plan(128, 576)
    assert (many["BLOCK_J"], many["num_warps"], many["BLOCK_H"]) == (32, 8, 128)


@pytest.mark.parametrize("lagged, with_workspace", [(False, False), (True, False), (False, True), (True, True)])
def test_padded_rows_and_empty_splits(lagged, with_workspace):
    # vLLM pads a decode batch with empty rows (seq_len 0 on the null block): the step must equal the
    # reference there too (no position, zero output), also through a workspace (on CUDA the lagged
    # step is then pipelined over two streams). Splits with nothing to attend must write the empty
    # softmax state whatever the split buffers held before (NaN here), alone in a row or beside splits
    # that have positions.
    c = build("small_gqa_odd_4bit", seed=8)
    seq = c["seq_lens"].clone()
    seq[1] = 0
    table = c["block_table"].clone()
    table[1] = 0
    c = {**c, "block_table": table, "seq_lens": seq}
    q, kc, vc, index, scale = c["query"], c["key_cache"], c["value_cache"], c["index"], c["scale"]
    config = c["config"].with_(lagged_selection=lagged)
    prev = ref.select_blocks(q * -1, index, table, seq, config) if lagged else None
    ws = _workspace_for(c, config) if with_workspace else None
    want = ref.sparse_decode(q, kc, vc, table, seq, index, config, scale, previous_block_ids=prev)
    got = sparse_decode_triton(q, kc, vc, table, seq, index, config, scale, previous_block_ids=prev, workspace=ws)
    assert (got[1][1] == -1).all() and (got[0][1] == 0).all()
    _assert_decode_matches(c, got, want)
    want_out, want_pos = want[0], want[1]
    tol = OUT_TOL[c["dtype"]]
    B, Hq, _ = q.shape
    plan = sparse_attention.attention_plan(B, Hq, kc.shape[2], want_pos.shape[-1], kc.shape[3], vc.shape[3])
    split_ws = sparse_attention.AttentionWorkspace(B, Hq, plan["NUM_SPLITS"], vc.shape[3], DEVICE)
    for t in (split_ws.m, split_ws.l, split_ws.acc):
        t.fill_(float("nan"))
    again = sparse_attention_triton(q, kc, vc, table, want_pos, scale, workspace=split_ws)
    torch.testing.assert_close(again, want_out, rtol=tol, atol=tol)
    # Splits that are empty beside splits that are not (a list of 224 slots, valid only at the front).
    long = torch.full((B, kc.shape[2], 224), -1, dtype=torch.int32, device=DEVICE)
    for b in range(B):
        n = min(int(seq[b]), 50)
        long[b, :, :n] = torch.arange(n, dtype=torch.int32, device=DEVICE)
    plan = sparse_attention.attention_plan(B, Hq, kc.shape[2], 224, kc.shape[3], vc.shape[3])
    assert plan["NUM_SPLITS"] >= 4
    split_ws = sparse_attention.AttentionWorkspace(B, Hq, plan["NUM_SPLITS"], vc.shape[3], DEVICE)
    for t in (split_ws.m, split_ws.l, split_ws.acc):
        t.fill_(float("nan"))
    torch.testing.assert_close(sparse_attention_triton(q, kc, vc, table, long, scale, workspace=split_ws),
                               ref.sparse_attention(q, kc, vc, table, long, scale), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode, group_score", [("asynctls", "lse"), ("asynctls", "max"), ("block_only", "lse"),
                                               ("exact_topk", "lse"), ("exact_topk", "max"), ("dense", "lse")])
@pytest.mark.parametrize("name", list(CASES))
def test_sparse_decode_matches_reference(name, mode, group_score):
    c = build(name, seed=5)
    config = c["config"].with_(mode=mode, group_score=group_score)
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"], config,
            c["scale"])
    want_out, want_pos, want_blocks = ref.sparse_decode(*args)
    got_out, got_pos, got_blocks = sparse_decode_triton(*args)
    assert got_pos.shape == want_pos.shape and got_blocks.shape == want_blocks.shape
    tol = OUT_TOL[c["dtype"]]
    if torch.equal(got_pos, want_pos):
        torch.testing.assert_close(got_out.float(), want_out.float(), rtol=tol, atol=tol)
    else:
        # A near-tie swapped a selected id: the output must still be exact attention over got_pos,
        # and the swap must be confined to a few slots.
        assert (got_pos != want_pos).float().mean() < 0.02
        again = ref.sparse_attention(c["query"], c["key_cache"], c["value_cache"], c["block_table"], got_pos, c["scale"])
        torch.testing.assert_close(got_out.float(), again.float(), rtol=tol, atol=tol)
    if mode in ("exact_topk", "dense"):
        assert torch.equal(got_blocks, want_blocks)


@pytest.mark.parametrize("name", list(CASES))
def test_lagged_selection_uses_previous_blocks(name):
    c = build(name, seed=6)
    config = c["config"].with_(lagged_selection=True)
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"], config,
            c["scale"])
    prev = ref.select_blocks(c["query"] * -1, c["index"], c["block_table"], c["seq_lens"], config)
    want_out, want_pos, want_blocks = ref.sparse_decode(*args, previous_block_ids=prev)
    got_out, got_pos, got_blocks = sparse_decode_triton(*args, previous_block_ids=prev)
    assert (got_pos != want_pos).float().mean() < 0.02
    again = ref.sparse_attention(c["query"], c["key_cache"], c["value_cache"], c["block_table"], got_pos, c["scale"])
    tol = OUT_TOL[c["dtype"]]
    torch.testing.assert_close(got_out.float(), again.float(), rtol=tol, atol=tol)


def _workspace_for(c, config, kv_dtype=None):
    q, kc, vc, bt = c["query"], c["key_cache"], c["value_cache"], c["block_table"]
    return SparseDecodeWorkspace(q.shape[0], q.shape[1], kc.shape[2], kc.shape[3], vc.shape[3], bt.shape[1],
                                 kc.shape[1], config, q.dtype, q.device, kv_dtype=kv_dtype)


def _assert_decode_matches(c, got, want):
    # Same positions up to a float32 near-tie, and exact attention over the positions chosen.
    (got_out, got_pos, got_blocks), (_, want_pos, want_blocks) = got, want
    assert (got_pos != want_pos).float().mean() < 0.02
    assert (got_blocks != want_blocks).float().mean() < 0.02
    again = ref.sparse_attention(c["query"], c["key_cache"], c["value_cache"], c["block_table"], got_pos, c["scale"])
    tol = OUT_TOL[c["dtype"]]
    torch.testing.assert_close(got_out.float(), again.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["small_gqa_odd_words_4bit", "small_gqa_8bit_bf16", "small_exact_16bit"]
                         + ([] if _INTERPRET else ["bench_qwen3_8b_scaled"]))
def test_lagged_selection_with_a_workspace_alternates_its_block_buffers(name):
    # Passing back the block ids a step returned (a view of the workspace) must not let the step
    # overwrite them before its token stage has read them: the outputs alternate between two buffers.
    # On CUDA the block stage runs on its own stream, pipelined with the token stage and attention.
    c = build(name, seed=11)
    config = c["config"].with_(lagged_selection=True)
    ws = _workspace_for(c, config)
    args = (c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"], config, c["scale"])
    queries = [c["query"], (c["query"].float() * -1).to(c["dtype"]), torch.randn_like(c["query"].float()).to(c["dtype"])]
    previous, buffers = None, []
    for q in queries:
        want = ref.sparse_decode(q, *args, previous_block_ids=None if previous is None else previous.clone())
        got = sparse_decode_triton(q, *args, previous_block_ids=previous, workspace=ws)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        _assert_decode_matches({**c, "query": q}, got, want)
        previous = got[2]
        buffers.append(previous.data_ptr())
    assert buffers[1] != buffers[0] and buffers[2] == buffers[0]


def test_index_query_kernel_equals_build_index_query():
    c = build("bench_qwen3_8b_scaled" if not _INTERPRET else "small_gqa_odd_words_4bit", seed=12)
    config = c["config"]
    group = c["query"].shape[1] // c["key_cache"].shape[2]
    heads = word_score_heads(config, group)
    want = build_index_query(c["query"], c["index"].channel_ids, config.index_bits, heads)
    out = torch.full_like(want, float("nan"))
    torch.testing.assert_close(index_query_triton(c["query"], c["index"].channel_ids, config.index_bits, out),
                               want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be contiguous float32"):
        index_query_triton(c["query"], c["index"].channel_ids, config.index_bits, out[:1])
    with pytest.raises(ValueError, match="index_bits"):
        index_query_triton(c["query"], c["index"].channel_ids, 16, out)


def _pipelined_case(seed, basis=False):
    """The benchmark's scaled shapes with lagged selection and a workspace (pipelined on CUDA): the query,
    the step's other arguments, previous block ids (another query's) and the workspace. With `basis`,
    the index in the keys' principal directions (`index_basis="pca"`)."""
    c = build("bench_qwen3_8b_scaled", seed=seed, basis=basis)
    config = c["config"].with_(lagged_selection=True, index_basis="pca" if basis else "channels")
    ws = _workspace_for(c, config)
    q, args = c["query"], (c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"], config,
                           c["scale"])
    previous = ref.select_blocks((q.float() * -1).to(q.dtype), c["index"], c["block_table"], c["seq_lens"], config)
    return q, args, previous, ws


@pytest.mark.skipif(not torch.cuda.is_available(), reason="stream order needs a CUDA device (the interpreter runs "
                    "the pipelined step's stages in order on one stream)")
@pytest.mark.parametrize("basis", [False, True])
def test_pipelined_step_is_ordered_with_the_callers_stream(basis):
    # The pipelined step forks its two streams from the caller's and joins them back: what the caller
    # queued just before (a long sleep, then the query's copy) must land before either stage reads the
    # query, and everything the step writes before the caller's next work (copies of the outputs); with a
    # basis, also the query's rotation.
    q, args, previous, ws = _pipelined_case(seed=14, basis=basis)
    static_q = torch.zeros_like(q)
    sparse_decode_triton(static_q, *args, previous_block_ids=previous, workspace=ws)  # compile; outputs of q = 0
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # tens of milliseconds of the caller's stream
    static_q.copy_(q)
    got = [t.clone() for t in sparse_decode_triton(static_q, *args, previous_block_ids=previous, workspace=ws)]
    torch.cuda.synchronize()
    want = sparse_decode_triton(q, *args, previous_block_ids=previous)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("basis", [False, True])
def test_pipelined_lagged_decode_is_graph_capturable(basis):
    # The block stage and the token stage fork from and join the capturing stream on their own streams;
    # a replay with a new query equals the eager step, and the block ids it returns are this query's
    # (the next step's input); with a basis too (the query rotated on the token stream), where the replay
    # also equals the reference.
    q, args, previous, ws = _pipelined_case(seed=13, basis=basis)
    static_q = q.clone()
    sparse_decode_triton(static_q, *args, previous_block_ids=previous, workspace=ws)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, pos, blocks = sparse_decode_triton(static_q, *args, previous_block_ids=previous, workspace=ws)
    new_q = torch.randn_like(q.float()).to(q.dtype)
    static_q.copy_(new_q)
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_pos, want_blocks = sparse_decode_triton(new_q, *args, previous_block_ids=previous)
    assert torch.equal(pos, want_pos) and torch.equal(blocks, want_blocks)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    if basis:  # and the pipelined step with a basis equals the reference
        c = build("bench_qwen3_8b_scaled", seed=13, basis=True)  # the case's data again (same seed)
        assert torch.equal(c["key_cache"], args[0])
        want = ref.sparse_decode(new_q, *args, previous_block_ids=previous)
        _assert_decode_matches(dict(c, query=new_q), (out, pos, blocks), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pipelined step's streams need a CUDA device")
@pytest.mark.parametrize("basis", [False, True])
def test_deferred_block_join_equals_joined_steps(basis):
    # Three layers, each joined by the next (the last by join_block_stage), eagerly and from a CUDA graph:
    # every output equals the step that joins its own block stage, block ids included (also with a basis).
    q, args, previous, ws = _pipelined_case(seed=15, basis=basis)
    gen = torch.Generator(device=q.device).manual_seed(3)
    queries = [torch.randn(q.shape, generator=gen, device=q.device).to(q.dtype) for _ in range(3)]
    want = [[t.clone() for t in sparse_decode_triton(x, *args, previous_block_ids=previous, workspace=ws)]
            for x in queries]
    ids_out = [torch.empty_like(previous) for _ in queries]

    def layers(qs):
        outs = []
        for i, x in enumerate(qs):
            out, pos, _ = sparse_decode_triton(x, *args, previous_block_ids=previous, workspace=ws,
                                               block_ids_out=ids_out[i], defer_block_join=True)
            outs.append((out.clone(), pos.clone()))
        ws.join_block_stage()
        return outs

    got = layers(queries)
    torch.cuda.synchronize()
    for (out, pos), ids, (w_out, w_pos, w_ids) in zip(got, ids_out, want):
        assert torch.equal(out, w_out) and torch.equal(pos, w_pos) and torch.equal(ids, w_ids)
    # A deferred call leaves its block stage pending; a call that joins its own joins it too.
    sparse_decode_triton(queries[0], *args, previous_block_ids=previous, workspace=ws, block_ids_out=ids_out[0],
                         defer_block_join=True)
    assert ws._pending_block_stage is not None
    joined = sparse_decode_triton(queries[1], *args, previous_block_ids=previous, workspace=ws)
    assert ws._pending_block_stage is None
    torch.cuda.synchronize()
    assert torch.equal(ids_out[0], want[0][2]) and all(torch.equal(a, b) for a, b in zip(joined, want[1]))
    static = [x.clone() for x in queries]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layers(static)
    for x in static:
        x.copy_(torch.randn(x.shape, generator=gen, device=x.device).to(x.dtype))
    for ids in ids_out:
        ids.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    for x, (out, pos), ids in zip(static, captured, ids_out):
        w_out, w_pos, w_ids = sparse_decode_triton(x, *args, previous_block_ids=previous)
        assert torch.equal(out, w_out) and torch.equal(pos, w_pos) and torch.equal(ids, w_ids)


def test_join_block_stage_refuses_a_stage_pending_across_a_capture_and_the_standard_step_joins(monkeypatch):
    # A block stage left pending by a deferred call must be joined in the capture mode it was recorded
    # in (an event recorded outside a capture cannot be waited on inside one, nor the reverse); a
    # standard step joins it before it reuses the workspace's block buffers.
    c = build("small_gqa_odd_words_4bit", seed=22)
    ws = _workspace_for(c, c["config"])
    for captured, capturing in ((False, True), (True, False)):
        ws._pending_block_stage = (object(), captured)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda capturing=capturing: capturing)
        with pytest.raises(RuntimeError, match="deferred block stage recorded (inside|outside) a CUDA-graph capture"):
            ws.join_block_stage()
    monkeypatch.undo()
    ws._pending_block_stage = None
    ws.join_block_stage()  # nothing pending: no-op
    joins = []
    monkeypatch.setattr(ws, "join_block_stage", lambda: joins.append(True))
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"])
    sparse_decode_triton(*args, c["config"], c["scale"], workspace=ws)
    assert joins == [True]


def test_deferred_block_join_needs_the_pipelined_step_and_its_own_buffer():
    c = build("small_gqa_odd_words_4bit", seed=21)
    config = c["config"].with_(lagged_selection=True)
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"])
    _, _, blocks = sparse_decode_triton(*args, config, c["scale"])
    previous = blocks.clone()
    ws = _workspace_for(c, config)
    with pytest.raises(ValueError, match="defer_block_join=True needs the pipelined step"):
        sparse_decode_triton(*args, c["config"], c["scale"], block_ids_out=torch.empty_like(previous),
                             defer_block_join=True)  # not lagged
    with pytest.raises(ValueError, match="block_ids_out must be contiguous int32"):
        sparse_decode_triton(*args, config, c["scale"], previous_block_ids=previous, workspace=ws,
                             block_ids_out=previous[:, :, :-1])
    with pytest.raises(ValueError, match="block_ids_out must not overlap previous_block_ids"):
        sparse_decode_triton(*args, config, c["scale"], previous_block_ids=previous, workspace=ws,
                             block_ids_out=previous)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="defer_block_join=True needs block_ids_out"):
            sparse_decode_triton(*args, config, c["scale"], previous_block_ids=previous, workspace=ws,
                                 defer_block_join=True)
    else:  # the interpreter has no streams: the pipelined step runs in order, without deferral
        with pytest.raises(ValueError, match="defer_block_join=True needs the pipelined step"):
            sparse_decode_triton(*args, config, c["scale"], previous_block_ids=previous, workspace=ws,
                                 block_ids_out=torch.empty_like(previous), defer_block_join=True)
    # A given buffer receives the step's block ids (standard step too).
    ids = torch.full_like(previous, -5)
    _, _, got = sparse_decode_triton(*args, c["config"], c["scale"], block_ids_out=ids)
    assert got.data_ptr() == ids.data_ptr() and torch.equal(ids, blocks)


def test_budget_covering_context_equals_dense():
    c = build("small_gqa_odd_4bit", seed=7)
    L = int(c["seq_lens"].max())
    config = c["config"].with_(num_blocks=64, token_budget=L)
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"], config,
            c["scale"])
    out, _, _ = sparse_decode_triton(*args)
    dense = ref.dense_decode_attention(c["query"], c["key_cache"], c["value_cache"], c["block_table"],
                                       c["seq_lens"], c["scale"])
    torch.testing.assert_close(out.float(), dense.float(), rtol=2e-5, atol=2e-5)


def quantise_fp8(cache, scale, dtype):
    """vLLM's fp8 KV cache write: stored = value / scale in `dtype`; returns (stored, dequantised float32)."""
    stored = (cache.float() / scale).to(dtype)
    return stored, stored.float() * scale


FP8_CASES = [n for n in CASES if CASES[n][7]["index_bits"] != 16]


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("name", FP8_CASES)
def test_fp8_kv_cache_equals_the_reference_over_dequantised_caches(name, fp8):
    """vLLM's `--kv-cache-dtype fp8`: the operator reads fp8 K/V with per-tensor scales from a device tensor
    and equals the reference run on the dequantised caches (float32); a covering budget equals dense
    attention over them. Under Triton's interpreter every dot takes the IEEE float32 branch, so the
    compiled fp8 branch (rows widened to the bf16 query for tensor-core dots) runs only on the GPU."""
    c = build(name, seed=11)
    k_scale, v_scale = 0.37, 1.9  # not powers of two: a scale applied twice or not at all shows
    kc8, kc = quantise_fp8(c["key_cache"], k_scale, fp8)
    if CASES[name][6]:  # MLA: the value is a view of the latent row, stored with k_scale (as TRITON_MLA's)
        Dv = c["value_cache"].shape[-1]
        vc8, vc, v_scale = kc8[..., :Dv], kc[..., :Dv], k_scale
    else:
        vc8, vc = quantise_fp8(c["value_cache"], v_scale, fp8)
    scales = (torch.tensor(k_scale, device=DEVICE), torch.tensor([v_scale], device=DEVICE))  # 0-d and (1,)
    q, bt, sl, index = c["query"], c["block_table"], c["seq_lens"], c["index"]
    tol = OUT_TOL[c["dtype"]]
    for lagged in (False, True):
        config = c["config"].with_(lagged_selection=lagged)
        prev = None
        if lagged:
            _, _, prev = ref.sparse_decode(q.float(), kc, vc, bt, sl, index, config.with_(lagged_selection=False),
                                           c["scale"])
        want_out, want_pos, _ = ref.sparse_decode(q.float(), kc, vc, bt, sl, index, config, c["scale"],
                                                  previous_block_ids=prev)
        got_out, got_pos, _ = sparse_decode_triton(q, kc8, vc8, bt, sl, index, config, c["scale"],
                                                   previous_block_ids=prev, kv_scales=scales)
        assert got_out.dtype == q.dtype
        in_workspace = sparse_decode_triton(q, kc8, vc8, bt, sl, index, config, c["scale"], previous_block_ids=prev,
                                            kv_scales=scales, workspace=_workspace_for(c, config, kv_dtype=fp8))
        assert torch.equal(in_workspace[0], got_out) and torch.equal(in_workspace[1], got_pos)
        if not torch.equal(got_pos, want_pos):  # a near-tie swapped an id: exact attention over got_pos
            assert (got_pos != want_pos).float().mean() < 0.02
            want_out = ref.sparse_attention(q.float(), kc, vc, bt, got_pos, c["scale"])
        torch.testing.assert_close(got_out.float(), want_out, rtol=tol, atol=tol)
    L = int(sl.max())
    cover = c["config"].with_(num_blocks=c["block_table"].shape[1] * c["key_cache"].shape[1]
                              // c["config"].selection_block_size, token_budget=L)
    out, _, _ = sparse_decode_triton(q, kc8, vc8, bt, sl, index, cover, c["scale"], kv_scales=scales)
    dense = ref.dense_decode_attention(q.float(), kc, vc, bt, sl, c["scale"])
    dense_tol = 2e-5 if c["dtype"] == torch.float32 else tol
    torch.testing.assert_close(out.float(), dense, rtol=dense_tol, atol=dense_tol)


def test_fp8_kv_cache_needs_its_scales_and_a_low_bit_index():
    c = build("small_gqa_odd_4bit", seed=12)
    kc8, _ = quantise_fp8(c["key_cache"], 0.5, torch.float8_e4m3fn)
    vc8, _ = quantise_fp8(c["value_cache"], 0.5, torch.float8_e4m3fn)
    args = (c["query"], kc8, vc8, c["block_table"], c["seq_lens"], c["index"])
    scales = (torch.tensor(0.5, device=DEVICE), torch.tensor(0.5, device=DEVICE))
    with pytest.raises(ValueError, match=r"fp8 \(torch.float8_e4m3fn\) KV cache needs kv_scales.*got None"):
        sparse_decode_triton(*args, c["config"], c["scale"])
    with pytest.raises(ValueError, match=r"needs kv_scales.*got \['torch.float32 \(3,\)"):
        sparse_decode_triton(*args, c["config"], c["scale"], kv_scales=(torch.ones(3, device=DEVICE), scales[1]))
    with pytest.raises(ValueError, match=r"needs kv_scales.*float"):
        sparse_decode_triton(*args, c["config"], c["scale"], kv_scales=(0.5, 0.5))
    with pytest.raises(ValueError, match="got index_bits=16, mode='asynctls'.*use index_bits 4 or 8"):
        sparse_decode_triton(*args, c["config"].with_(index_bits=16), c["scale"], kv_scales=scales)
    with pytest.raises(ValueError, match="got index_bits=4, mode='exact_topk'"):
        sparse_decode_triton(*args, c["config"].with_(mode="exact_topk"), c["scale"], kv_scales=scales)
    with pytest.raises(ValueError, match="kv_scales apply to fp8 KV caches only"):
        sparse_decode_triton(c["query"], c["key_cache"], c["value_cache"], *args[3:], c["config"], c["scale"],
                             kv_scales=scales)
    # A workspace for an unquantised cache: its split buffers follow another plan than an fp8 cache's.
    with pytest.raises(ValueError, match=r"another call; fp8 cache: workspace False, call True "
                                         r"\(build it with kv_dtype=torch.float8_e4m3fn\)$"):
        sparse_decode_triton(*args, c["config"], c["scale"], kv_scales=scales, workspace=_workspace_for(c, c["config"]))
    with pytest.raises(ValueError, match=r"another call; fp8 cache: workspace True, call False"):
        sparse_decode_triton(c["query"], c["key_cache"], c["value_cache"], *args[3:], c["config"], c["scale"],
                             workspace=_workspace_for(c, c["config"], kv_dtype=torch.uint8))
    # Only the fields that differ are named; no cache hint when the cache kind matches.
    small = {**c, "query": c["query"][:2], "block_table": c["block_table"][:2]}
    with pytest.raises(ValueError, match=r"another call; batch: workspace 2, call 4$"):
        sparse_decode_triton(c["query"], c["key_cache"], c["value_cache"], *args[3:], c["config"], c["scale"],
                             workspace=_workspace_for(small, c["config"]))
    with pytest.raises(ValueError, match=r"kv_dtype must be None or one of .*torch.uint8.*; got 'fp8'"):
        _workspace_for(c, c["config"], kv_dtype="fp8")
    with pytest.raises(ValueError, match=r"kv_dtype must be None or one of .*; got torch.int8"):
        _workspace_for(c, c["config"], kv_dtype=torch.int8)


def test_topk_rows_ties_and_short_rows():
    scores = torch.randn(5, 300)
    scores[0, :250] = float("-inf")  # fewer candidates than k
    scores[1] = 1.0  # all ties: lowest indices win
    scores[2, ::2] = float("-inf")
    got = topk_rows(scores.to(DEVICE), 64).cpu()
    assert (got[0, :50] >= 250).all() and (got[0, 50:] == -1).all()
    assert torch.equal(got[1], torch.arange(64, dtype=torch.int32))
    for r in (2, 3, 4):
        want = scores[r].topk(64).values.sort().values
        torch.testing.assert_close(scores[r][got[r].long()].sort().values, want, rtol=0, atol=0)


# The interpreter runs the kernel's reductions in Python: smaller rows there.
_HARD_ROW_SIZES = [(1024, 256), (1024, 16), (300, 299)] if _INTERPRET else [(2048, 512), (8192, 128), (1000, 999)]


@pytest.mark.parametrize("n,k", _HARD_ROW_SIZES)
def test_topk_rows_search_is_exact_on_hard_rows(n, k):
    # The threshold search guesses from a normal model of the row, then interpolates on the count;
    # rows where both are useless (huge outliers, values far apart in magnitude, heavy duplicates at
    # the threshold, tiny denormal-ish ranges, skewed or heavy tails, clusters) must still end at the
    # exact k-th value: the guesses only steer a bracketing search with a bisection fallback.
    g = torch.Generator().manual_seed(3)
    rows = [
        torch.randn(n, generator=g),
        torch.randn(n, generator=g) * 1e-30,
        torch.cat([torch.full((1,), 3e38), torch.randn(n - 1, generator=g)]),
        torch.randn(n, generator=g).exp() ** 8,  # heavy tail, all positive
        -(torch.randn(n, generator=g).exp() ** 8),  # all negative
        torch.randint(-3, 4, (n,), generator=g).float(),  # massive ties at the threshold
        torch.randn(n, generator=g).round(decimals=2),
        torch.where(torch.rand(n, generator=g) < 0.5, -torch.inf, torch.randn(n, generator=g)),
        # far from the normal model the first guesses come from: skewed and heavy-tailed rows
        -torch.log(-torch.log(torch.rand(n, generator=g))),  # Gumbel
        torch.randn(n, generator=g).exp(),  # log-normal
        torch.randn(n, generator=g) / torch.randn(n, generator=g).abs().clamp(min=1e-3),  # Cauchy-like
        torch.rand(n, generator=g),  # uniform: lighter tails than the model
        torch.full((n,), 7.0),  # zero spread: all ties
        torch.where(torch.arange(n) < k + 3, 5.0, -1.0) + torch.randn(n, generator=g) * 1e-6,  # two clusters
    ]
    scores = torch.stack(rows)
    got = topk_rows(scores.to(DEVICE), k).cpu()
    for r in range(scores.shape[0]):
        finite = int((scores[r] > float("-inf")).sum())
        kk = min(k, finite)
        chosen = got[r][got[r] >= 0].long()
        assert chosen.numel() == kk and chosen.unique().numel() == kk
        assert (chosen.diff() > 0).all()  # ascending
        want = scores[r].topk(kk).values.sort().values
        assert torch.equal(scores[r][chosen].sort().values, want), r
        # ties at the threshold go to the lowest indices
        t = want[0]
        ties = (scores[r] == t).nonzero().flatten()
        n_ties_kept = int((scores[r][chosen] == t).sum())
        assert torch.equal(chosen[scores[r][chosen] == t], ties[:n_ties_kept])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_workspace_decode_is_graph_capturable():
    c = build("bench_qwen3_8b_scaled", seed=8)
    q, kc, vc, bt, sl, index, config = (c[k] for k in ("query", "key_cache", "value_cache", "block_table",
                                                      "seq_lens", "index", "config"))
    ws = SparseDecodeWorkspace(q.shape[0], q.shape[1], kc.shape[2], kc.shape[3], vc.shape[3], bt.shape[1],
                               kc.shape[1], config, q.dtype, q.device)
    static_q = q.clone()
    sparse_decode_triton(static_q, kc, vc, bt, sl, index, config, c["scale"], workspace=ws)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, pos, blocks = sparse_decode_triton(static_q, kc, vc, bt, sl, index, config, c["scale"], workspace=ws)
    new_q = torch.randn_like(q.float()).to(q.dtype)
    static_q.copy_(new_q)
    graph.replay()
    want_out, want_pos, _ = sparse_decode_triton(new_q, kc, vc, bt, sl, index, config, c["scale"])
    assert torch.equal(pos, want_pos)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)


def test_programmatic_dependent_launch_only_where_supported(monkeypatch):
    from asynctls_tip_kernels import sparse_attention as sa

    t = torch.zeros(1, device=DEVICE)
    if _INTERPRET or not torch.cuda.is_available():
        assert not sa.pdl_enabled(t) and sa.pdl_launch(t) == {"PDL": 0}
    elif torch.cuda.get_device_capability()[0] < 9 or torch.version.hip is not None:
        assert not sa.pdl_enabled(t)
    monkeypatch.setattr(sa, "USE_PDL", False)
    assert not sa.pdl_enabled(t) and sa.pdl_launch(t) == {"PDL": 0}
    monkeypatch.setattr(sa, "USE_PDL", True)
    supported = sa.pdl_enabled(t)
    with sa.pdl_scope(False):
        assert not sa.pdl_enabled(t) and sa.pdl_launch(t) == {"PDL": 0}
        with sa.pdl_scope(True):
            assert sa.pdl_enabled(t) == supported
        assert sa._pdl_scope.get() is False
    assert sa._pdl_scope.get() is None
    monkeypatch.setenv("ASYNCTLS_PDL", "0")
    assert not sa.pdl_enabled(t)


def test_pdl_scope_decides_on_a_supported_device(monkeypatch):
    # Runs anywhere: a stand-in CUDA tensor on a device marked as supporting PDL.
    from types import SimpleNamespace

    from asynctls_tip_kernels import sparse_attention as sa

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ASYNCTLS_PDL", raising=False)
    monkeypatch.setattr(sa, "USE_PDL", True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setitem(sa._pdl_support, 0, True)
    t = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert sa.pdl_enabled(t) and sa.pdl_launch(t) == {"PDL": 2, "launch_pdl": True}  # trigger at the end
    monkeypatch.setattr(sa, "PDL_TRIGGER", "start")
    assert sa.pdl_launch(t) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setattr(sa, "PDL_TRIGGER", "middle")
    with pytest.raises(ValueError, match="PDL_TRIGGER must be one of .*'end'.*'start'.*got 'middle'"):
        sa.pdl_launch(t)
    monkeypatch.setattr(sa, "PDL_TRIGGER", "end")
    with sa.pdl_scope(False):
        assert not sa.pdl_enabled(t) and sa.pdl_launch(t) == {"PDL": 0}
        with sa.pdl_scope(True):
            assert sa.pdl_enabled(t)
        assert not sa.pdl_enabled(t)
    assert sa.pdl_enabled(t)
    monkeypatch.setattr(sa, "USE_PDL", False)
    with sa.pdl_scope(True):
        assert not sa.pdl_enabled(t)


def test_operator_chooses_programmatic_dependent_launch_per_schedule(monkeypatch):
    # Each schedule opens its own PDL scope (`PDL_STANDARD_STEP`, `PDL_PIPELINED_STEP`; the pipelined
    # lagged step on CUDA with a workspace): every launch of a step sees it, and it closes after the step.
    from asynctls_tip_kernels import sparse_attention as sa
    from asynctls_tip_kernels import sparse_decode as sd

    seen = []
    monkeypatch.setattr(sa, "pdl_enabled", lambda t: seen.append(sa._pdl_scope.get()) or False)
    monkeypatch.setattr(sd, "PDL_STANDARD_STEP", False)  # different values, so the scopes can be told apart
    monkeypatch.setattr(sd, "PDL_PIPELINED_STEP", True)
    c = build("small_gqa_odd_words_4bit", seed=13)
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"])
    sparse_decode_triton(*args, c["config"], c["scale"])
    assert len(seen) >= 5 and set(seen) == {sd.PDL_STANDARD_STEP} and sa._pdl_scope.get() is None
    config = c["config"].with_(lagged_selection=True)
    _, _, blocks = sparse_decode_triton(*args, config, c["scale"])
    seen.clear()
    sparse_decode_triton(*args, config, c["scale"], previous_block_ids=blocks.clone(), workspace=_workspace_for(c, config))
    pipelined = DEVICE == "cuda"  # the interpreter runs the stages in order, as the standard step
    # (on CUDA this is the check that the pipelined step opens its own scope)
    assert set(seen) == {sd.PDL_PIPELINED_STEP if pipelined else sd.PDL_STANDARD_STEP} and sa._pdl_scope.get() is None


@pytest.mark.parametrize("cbs, S, hkv, nb", [(64, 16, 2, 4), (64, 64, 8, 128), (16, 16, 1, 3)])
def test_lagged_block_ids_kernels_equal_the_reference(cbs, S, hkv, nb):
    from asynctls_tip_kernels.lagged_blocks import previous_block_ids_triton, record_block_ids_triton

    g = torch.Generator().manual_seed(cbs + S + nb)
    config = SparseAttentionConfig(selection_block_size=S, num_blocks=nb, token_budget=S * nb, sink_tokens=S,
                                   local_tokens=16, index_bits=4, index_channels=8, lagged_selection=True)
    num_cache_blocks, W, B = 50, 6, 7
    slots = num_cache_blocks * cbs // S
    state = torch.randint(-1, 50, (slots + 1, hkv, nb), generator=g, dtype=torch.int32)
    written = torch.randint(-1, W * cbs, (slots + 1, 2), generator=g, dtype=torch.int32)
    table = torch.randperm(num_cache_blocks, generator=g)[: B * W].view(B, W).to(torch.int32)
    # Lengths at block boundaries, short ones (fallback without blocks), a padded row (0).
    lens = torch.tensor([cbs + 1, 2 * cbs, S + 1, 3, 1, 0, W * cbs - 5], dtype=torch.int32)
    # Entries written by the previous step (length L - 1) for rows 0-3, by the row's request (its first
    # block) for rows 0-2 and by another request for row 3.
    prev_slots = ref.lagged_slots(table, (lens.long() - 2).clamp(min=0), cbs, S)
    written[prev_slots[:4], 0] = lens[:4] - 1
    written[prev_slots[:4], 1] = table[:4, 0]
    written[prev_slots[3], 1] = table[3, 0] + 1
    padded_table = torch.zeros(B, W + 3, dtype=torch.int32)
    padded_table[:, :W] = table  # a wider buffer seen through a view: row stride != W
    table_view = padded_table[:, :W]

    want_hits, got_hits = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64, device=DEVICE)
    want = ref.previous_block_ids(state, written, table, lens, config, cbs, hits=want_hits)
    got = previous_block_ids_triton(state.to(DEVICE), written.to(DEVICE), table_view.to(DEVICE), lens.to(DEVICE),
                                    config, cbs, hits=got_hits)
    assert torch.equal(got.cpu(), want)
    assert int(want_hits) == 3 and int(got_hits) == 3
    assert not torch.equal(want, ref.recent_block_ids(lens, config, hkv))  # some rows read real entries

    ids = torch.randint(-1, 60, (B, hkv, nb), generator=g, dtype=torch.int32)
    want_state, want_written = state.clone(), written.clone()
    ref.record_block_ids(want_state, want_written, table, lens, ids, config, cbs)
    got_state, got_written = state.to(DEVICE), written.to(DEVICE)
    record_block_ids_triton(got_state, got_written, table_view.to(DEVICE), lens.to(DEVICE), ids.to(DEVICE), config, cbs)
    assert torch.equal(got_state.cpu(), want_state) and torch.equal(got_written.cpu(), want_written)
    with pytest.raises(ValueError, match="block_ids must be contiguous int32"):
        record_block_ids_triton(got_state, got_written, table.to(DEVICE), lens.to(DEVICE), ids.to(DEVICE)[..., :1],
                                config, cbs)


# ----------------------------------------------------------------------------------------------
# Index basis ("pca")
# ----------------------------------------------------------------------------------------------
PCA_CASES = (["small_gqa_odd_words_4bit", "small_mla", "small_exact_16bit"]
             + ([] if _INTERPRET else ["bench_qwen3_8b_scaled", "bench_mla_scaled"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, hq, hkv, d", [(8, 32, 8, 128), (37, 3, 3, 64), (3, 16, 1, 96), (5, 20, 1, 576)])
def test_rotate_equals_the_references_rotation(n, hq, hkv, d, dtype):
    gen = torch.Generator().manual_seed(n + d)
    basis = torch.linalg.qr(torch.randn(hkv, d, d, generator=gen))[0].transpose(1, 2).contiguous()
    x = torch.randn(n, 2 * hq, d, generator=gen).to(dtype)[:, ::2]  # strided heads
    index = ref.SparseIndex(*(torch.empty(0),) * 6, dtype, basis)
    want = ref.rotate_query(x, index)
    got = rotate_triton(x.to(DEVICE), basis.to(DEVICE)).cpu()
    assert got.dtype == dtype and got.shape == x.shape
    # float32 rounding (three TF32 passes on the GPU); a bf16 output within one unit in the last place.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    with pytest.raises(ValueError, match="rotate: x must be"):
        rotate_triton(x.to(DEVICE), basis.to(DEVICE)[:, :-1])


@pytest.mark.parametrize("name", PCA_CASES)
def test_write_index_with_a_basis_matches_reference(name, write_plan):
    # The writer rotates the keys into the basis (one launch), then writes as without a basis: the same
    # summaries and codes as the reference writing the keys so rotated.
    c = build(name, seed=2, basis=True)
    config, index = c["config"].with_(index_basis="pca"), c["index"]
    assert index.basis is not None
    got = copy_index(index, lambda t: t.to(DEVICE).clone())
    want = _without_basis(copy_index(index, lambda t: t.cpu().clone()))
    for t in (want, got):
        fill_summaries_with_junk_on(t, seed=7)
    keys, slots = c["flat_keys"], c["slots"]
    rotated = rotate_triton(keys.to(index.key_dtype).to(DEVICE), got.basis).cpu()
    ref.write_index(want, rotated, slots, config)
    write_index_triton(got, keys.to(DEVICE), slots.to(DEVICE), config)
    assert_same_summaries(got, want)
    if want.codes is not None:
        assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)


def fill_summaries_with_junk_on(index, seed):
    junk = copy_index(index, lambda t: t.cpu().clone())
    fill_summaries_with_junk(junk, torch.Generator().manual_seed(seed))
    for name in ("block_min", "block_max", "block_scale"):
        getattr(index, name).copy_(getattr(junk, name))


@pytest.mark.parametrize("lagged", [False, True])
@pytest.mark.parametrize("name", PCA_CASES)
def test_sparse_decode_with_a_basis_matches_reference(name, lagged):
    # Both selections score the rotated query; attention reads the cache as it is. With lagged
    # selection and a workspace (pipelined on CUDA: the token scorer writes the rotated index query).
    c = build(name, seed=3, basis=True)
    config = c["config"].with_(index_basis="pca", lagged_selection=lagged)
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["index"], config,
            c["scale"])
    prev = ref.select_blocks((c["query"].float() * -1).to(c["dtype"]), c["index"], c["block_table"],
                             c["seq_lens"], config) if lagged else None
    want = ref.sparse_decode(*args, previous_block_ids=prev)
    ws = _workspace_for(c, config) if lagged else None
    got = sparse_decode_triton(*args, previous_block_ids=prev, workspace=ws)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    _assert_decode_matches(c, got, want)
    # The index holds rotated keys: scoring the query as it is would select other positions or blocks
    # (with 16 bits and lagged selection only the block choice reads the index).
    plain = ref.sparse_decode(*args[:5], _without_basis(c["index"]), config, c["scale"], previous_block_ids=prev)
    assert not (torch.equal(plain[1], want[1]) and torch.equal(plain[2], want[2]))


def _without_basis(index):
    return ref.SparseIndex(index.block_min, index.block_max, index.block_scale, index.channel_ids, index.codes,
                           index.scales, index.key_dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_captured_before_the_basis_is_calibrated_uses_it():
    # vLLM captures its decode graphs before any real write calibrates the index: the captured step must
    # rotate with the basis calibrated (in place) afterwards, and so must a captured index write.
    c = build("bench_qwen3_8b_scaled", seed=4)
    config = c["config"].with_(index_basis="pca")
    kc = c["key_cache"]
    index = ref.allocate_index(kc.shape[0], kc.shape[1], kc.shape[2], kc.shape[3], config, kc.dtype, DEVICE)
    ws = _workspace_for(c, config)
    args = (c["query"], kc, c["value_cache"], c["block_table"], c["seq_lens"], index, config, c["scale"])
    keys, slots = c["flat_keys"].to(DEVICE), c["slots"].to(DEVICE)
    captured_keys = keys[:8].clone()
    captured_slots = torch.full((8,), -1, dtype=torch.int64, device=DEVICE)  # padding: no write at capture
    write_ws = IndexWriteWorkspace(index.block_min.shape[0], index.block_min.shape[1], DEVICE)
    sparse_decode_triton(*args, workspace=ws)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, positions, _ = sparse_decode_triton(*args, workspace=ws)
        write_index_triton(index, captured_keys, captured_slots, config, write_ws)
    ref.set_index_basis(index, ref.choose_index_basis(keys.float()))
    write_index_triton(index, keys, slots, config, write_ws)
    want = [t.clone() for t in sparse_decode_triton(*args)]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(positions, want[1])
    torch.testing.assert_close(out.float(), want[0].float(), rtol=0, atol=0)
    # The captured write rotates too: replayed with tokens 1..8 of the first sequence at their own slots
    # (inside its first selection block, none starting it), the summaries and codes stay bit-equal.
    before = copy_index(index, lambda t: t.clone())
    captured_keys.copy_(keys[1:9])
    captured_slots.copy_(slots[1:9])
    graph.replay()
    torch.cuda.synchronize()
    assert_same_summaries(index, copy_index(before, lambda t: t.cpu()))
    assert torch.equal(index.codes, before.codes)


def _vllm_decode_batch(gen, cbs, seq_lens=(150, 37, 0), width=12):
    """A decode batch as vLLM hands it over: (seq_lens, table width W, cache blocks, shuffled block table
    (B, W) int32, the slots of every written token); the last row is padding (length 0), as in vLLM's
    captured batches."""
    seq_lens = list(seq_lens)
    B = len(seq_lens)
    num_cache_blocks = B * width + 1
    table = torch.randperm(num_cache_blocks, generator=gen)[: B * width].view(B, width).to(torch.int32)
    slots = torch.cat([table[b, torch.arange(n) // cbs].long() * cbs + torch.arange(n) % cbs
                       for b, n in enumerate(seq_lens)])
    return seq_lens, width, num_cache_blocks, table, slots


@pytest.mark.parametrize("fp8", [False, True], ids=["auto", "fp8"])
@pytest.mark.parametrize("lagged", [False, True])
def test_gpu_mla_backend_decode_over_vllms_latent_cache(lagged, fp8):
    """What the GPU MLA backend runs (`vllm_asynctls.mla_decode`): rows written as vLLM writes its MLA
    cache (`concat(kv_c_normed, k_pe)` into a (blocks, block_size, L + P) cache) and into the layer's
    index, then the sparse operator with the absorbed query. A covering budget equals dense MLA
    attention (float32); a small one equals the reference operator on the same views. With `fp8`
    (`--kv-cache-dtype fp8`), the rows are stored as TRITON_MLA's cache holds them (row / k_scale in e4m3,
    in a byte tensor), the index is written from the unquantised rows, and the truth is the same
    attention over the dequantised cache (`_k_scale` scales key and value: one row)."""
    from vllm_asynctls.layer_index import LayerIndex
    from vllm_asynctls.mla_decode import mla_key_rows, sparse_mla_decode

    gen = torch.Generator().manual_seed(11)
    L, P, H, cbs = 64, 32, 6, 16
    seq_lens, W, num_cache_blocks, table, slots = _vllm_decode_batch(gen, cbs)
    B = len(seq_lens)
    kv_c = torch.randn(len(slots), L, generator=gen) * (1 + 3 * (torch.rand(L, generator=gen) < 0.1))
    k_pe = torch.randn(len(slots), 1, P, generator=gen)  # vLLM passes k_pe with a head axis of 1
    rows = mla_key_rows(kv_c, k_pe, torch.float32)
    assert rows.shape == (len(slots), 1, L + P)
    k_scale = torch.tensor(0.043)  # not a power of two: a scale missed or applied twice shows
    if fp8:  # junk (finite e4m3 bit patterns) outside the sequences
        cache = torch.randint(0, 120, (num_cache_blocks, cbs, L + P), dtype=torch.uint8, generator=gen)
        cache.view(-1, L + P)[slots] = (rows[:, 0] / k_scale).to(torch.float8_e4m3fn).view(torch.uint8)
        truth = cache.view(torch.float8_e4m3fn).float() * k_scale
    else:
        cache = torch.randn(num_cache_blocks, cbs, L + P, generator=gen)  # junk outside the sequences
        cache.view(-1, L + P)[slots] = rows[:, 0]  # what concat_and_cache_mla writes
        truth = cache
    q = torch.randn(B, H, L + P, generator=gen)
    scale = 1.0 / math.sqrt(L + P)
    cache, truth, q, table, lens, k_scale = (t.to(DEVICE) for t in (
        cache, truth, q, table, torch.tensor(seq_lens, dtype=torch.int32), k_scale))
    key_cache = truth.unsqueeze(2)
    value_cache = key_cache[..., :L]

    def run(config):
        lix = LayerIndex(config, 1, L + P, is_mla=True)
        lix.ensure(num_cache_blocks, cbs, torch.float32, DEVICE)
        ref.calibrate_index(lix.index, rows.to(DEVICE), config)  # as the first real write would
        lix.calibrated = True
        # vLLM pads the rows it writes (slot -1) to the captured token count.
        pad = torch.randn(3, 1, L + P, generator=gen)
        lix.write(torch.cat([rows, pad]).to(DEVICE), torch.cat([slots, torch.full((3,), -1)]).to(DEVICE))
        previous = lix.previous_blocks(table, lens)  # lagged: what a request's first step starts from
        previous = None if previous is None else previous.clone()
        # The workspace the GPU MLA builder makes: one kv head, key = latent + rope, value = latent.
        ws = SparseDecodeWorkspace(B, H, 1, L + P, L, W, cbs, config, torch.float32, DEVICE, kv_dtype=cache.dtype)
        warmed = []

        def warm(*args):  # the layer's DecodeAttentionWarmup: the operator's own inputs, then a real warm-up
            warmed.append(args)
            warm_decode_attention(*args[:6], B, args[6])

        out = sparse_mla_decode(q, cache, table, lens, L, lix, config, scale, workspace=ws,
                                k_scale=k_scale if fp8 else None, warm_attention=warm)
        (wq, wk, wv, wbt, wconfig, wscale, wscales), = warmed
        assert wq is q and wbt is table and wconfig is config and wscale == scale
        assert wk.shape == (num_cache_blocks, cbs, 1, L + P) and wv.shape == (num_cache_blocks, cbs, 1, L)
        assert wk.dtype == (torch.float8_e4m3fn if fp8 else torch.float32) and (wscales is not None) == fp8
        return lix, previous, out

    covering = SparseAttentionConfig.for_mla(selection_block_size=16, num_blocks=16, token_budget=160, sink_tokens=16,
                                             local_tokens=16, index_channels=32, lagged_selection=lagged)
    _, _, out = run(covering)
    dense = ref.dense_decode_attention(q, key_cache, value_cache, table, lens, scale)
    assert out.shape == (B, H, L)
    torch.testing.assert_close(out[:2].float(), dense[:2].float(), rtol=2e-5, atol=2e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # the padded row attends to nothing

    small = covering.with_(num_blocks=4, token_budget=24)
    lix, previous, out = run(small)
    want, _, _ = ref.sparse_decode(q, key_cache, value_cache, table, lens, lix.index, small, scale,
                                   previous_block_ids=previous)
    torch.testing.assert_close(out[:2].float(), want[:2].float(), rtol=2e-5, atol=2e-5)
    assert not torch.allclose(out[0].float(), dense[0].float(), atol=1e-3)  # it did select


def test_gpu_backend_fp8_decode_over_vllms_byte_cache():
    """What the GQA GPU backend runs under `--kv-cache-dtype fp8` (`vllm_asynctls.fp8_kv`): K/V written as
    vLLM writes them (K / k_scale, V / v_scale in e4m3, in a byte tensor of FLASH_ATTN's logical (blocks,
    kv heads, block_size, 2 * D) shape over an NHD layout), the query quantised by q_scale as the layer
    does for FlashAttention 3, the index written from the unquantised keys. A covering budget equals dense
    attention over the dequantised query and caches (float32); a small one equals the reference there."""
    from vllm_asynctls.fp8_kv import fp8_decode_inputs
    from vllm_asynctls.layer_index import LayerIndex

    gen = torch.Generator().manual_seed(13)
    Hkv, group, D, cbs = 2, 3, 32, 16
    seq_lens, W, nb, table, slots = _vllm_decode_batch(gen, cbs)
    B = len(seq_lens)
    physical = torch.randint(0, 120, (nb, cbs, Hkv, 2 * D), dtype=torch.uint8, generator=gen)  # junk (finite)
    kv_cache = physical.permute(0, 2, 1, 3)  # vLLM's logical shape over the NHD layout
    key = torch.randn(len(slots), Hkv, D, generator=gen) * (1 + 3 * (torch.rand(D, generator=gen) < 0.1))
    value = torch.randn(len(slots), Hkv, D, generator=gen)
    q_scale, k_scale, v_scale = (torch.tensor(s) for s in (0.05, 0.031, 0.011))
    rows = physical.view(-1, Hkv, 2 * D)
    rows[slots, :, :D] = (key / k_scale).to(torch.float8_e4m3fn).view(torch.uint8)  # reshape_and_cache_flash
    rows[slots, :, D:] = (value / v_scale).to(torch.float8_e4m3fn).view(torch.uint8)
    q8 = (torch.randn(B, Hkv * group, D, generator=gen) / q_scale).to(torch.float8_e4m3fn)
    scale = 1.0 / math.sqrt(D)
    kv_cache, q8, table, lens = (t.to(DEVICE) for t in (kv_cache, q8, table, torch.tensor(seq_lens, dtype=torch.int32)))
    q_scale, k_scale, v_scale = (t.to(DEVICE) for t in (q_scale, k_scale, v_scale))
    key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)  # as the impl splits it
    q, kc8, vc8, kv_scales = fp8_decode_inputs(q8, key_cache, value_cache, q_scale, k_scale, v_scale, torch.float32)
    assert q.dtype == torch.float32 and kc8.dtype == vc8.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(q, q8.float() * q_scale)
    kc, vc = kc8.float() * k_scale, vc8.float() * v_scale  # the dequantised caches: the truth here

    def run(config):
        lix = LayerIndex(config, Hkv, D, is_mla=False)
        lix.ensure(nb, cbs, torch.float32, DEVICE)
        ref.calibrate_index(lix.index, key.to(DEVICE), config)
        lix.calibrated = True
        lix.write(key.to(DEVICE), slots.to(DEVICE))
        ws = SparseDecodeWorkspace(B, Hkv * group, Hkv, D, D, W, cbs, config, torch.float32, DEVICE,
                                   kv_dtype=kv_cache.dtype)  # the builder's kv_cache_spec.dtype: uint8
        assert warm_decode_attention(q, kc8, vc8, table, config, scale, B, kv_scales)[0] == 1  # fp8 variants too
        out, _, _ = sparse_decode_triton(q, kc8, vc8, table, lens, lix.index, config, scale, workspace=ws,
                                         kv_scales=kv_scales)
        return lix, out

    covering = SparseAttentionConfig(selection_block_size=16, num_blocks=16, token_budget=160, sink_tokens=16,
                                     local_tokens=16, index_channels=8)
    _, out = run(covering)
    dense = ref.dense_decode_attention(q, kc, vc, table, lens, scale)
    torch.testing.assert_close(out[:2], dense[:2], rtol=2e-5, atol=2e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    small = covering.with_(num_blocks=4, token_budget=24)
    lix, out = run(small)
    want, _, _ = ref.sparse_decode(q, kc, vc, table, lens, lix.index, small, scale)
    torch.testing.assert_close(out[:2], want[:2], rtol=2e-5, atol=2e-5)
    assert not torch.allclose(out[0], dense[0], atol=1e-3)  # it did select
