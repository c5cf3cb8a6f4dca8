"""The KV offload inside a real vLLM engine (the CPU build) on the tiny float32 GQA model.

Two engine starts, shared by every check (module-scoped fixtures), both with the asynctls backend at
the same knobs and the same device KV cache of `DEVICE_BLOCKS` blocks of 32 tokens:
- offload off: the reference tokens, and how many long requests that cache lets decode at once;
- offload on (`AsyncTLSOffloadConnector` + `AsyncTLSOffloadSpec`): a hot cache of `HOT_BLOCKS` blocks
  per request and kv head, far smaller than the contexts.

What is shown:
- Greedy tokens with offload on equal those with offload off, on six ~1.2K-1.5K-token prompts
  submitted together (misses, evictions and host-to-device copies happen on every step) and on one
  short prompt whose context the budget covers.
- The six long requests (a bounded load: at most `MAX_NUM_SEQS` = 4 run at once) all complete (every
  one its `MAX_TOKENS` tokens, finish reason "length") while the device cache is smaller than their
  combined KV; with offload on, four decode in the same steps (the scheduler frees their offloaded
  blocks), which the same cache without offload cannot do.
- Counters: hit rate below 1 with bytes copied on the long load, near 1 when the budget covers the
  context; no eviction overflow; exposed copy time measured.
"""

from __future__ import annotations

import math
import os

import pytest
from tiny_models import random_prompts
from vllm_engines import shutdown_engine

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

pytestmark = pytest.mark.engine

BLOCK = 32  # CPU_ATTN takes multiples of 32
MAX_TOKENS = 20
LONG_LENGTHS = (1500, 1450, 1400, 1350, 1300, 1200)  # more requests than max_num_seqs
SHORT_LENGTH = 135  # + 20 generated <= 16 sinks + 16 local + 128 budget: the budget covers the context
KNOBS = dict(
    token_budget=128, num_blocks=8, selection_block_size=16, sink_tokens=16, local_tokens=16,
    index_bits=4, dense_threshold=128,
)
HOT_BLOCKS = 12  # >= 8 selected + 1 sink + 2 local blocks; 384 tokens per kv head against 1.2K-1.5K contexts
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 2048
DEVICE_BLOCKS = 120  # 3840 tokens; the hot caches take MAX_NUM_SEQS * HOT_BLOCKS = 48 of them
ENGINE_KW = dict(
    dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=BLOCK, enforce_eager=True, seed=0,
    max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=1024, num_gpu_blocks_override=DEVICE_BLOCKS,
    gpu_memory_utilization=0.3, attention_backend="asynctls",
)


def _generate(llm, prompts):
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


def _serve(model_path, long_prompts, short_prompt, **kw) -> dict:
    """Start one engine, serve the long load then the short prompt, counters after each; shut down."""
    from vllm import LLM

    from vllm_asynctls.counters import read_counters, reset_counters

    llm = LLM(model=model_path, **ENGINE_KW, **kw)
    try:
        llm.collective_rpc(reset_counters)
        long_out = _generate(llm, long_prompts)
        (long_counters,) = llm.collective_rpc(read_counters)
        llm.collective_rpc(reset_counters)
        short_out = _generate(llm, [short_prompt])
        (short_counters,) = llm.collective_rpc(read_counters)
        return {"long": (long_out, long_counters), "short": (short_out, short_counters)}
    finally:
        shutdown_engine(llm)


@pytest.fixture(scope="module")
def prompts(qwen3_gqa_path):
    *long, short = random_prompts(qwen3_gqa_path, (*LONG_LENGTHS, SHORT_LENGTH))
    return long, short


@pytest.fixture(scope="module")
def offload_off(qwen3_gqa_path, prompts):
    return _serve(qwen3_gqa_path, *prompts, additional_config={"asynctls": KNOBS})


@pytest.fixture(scope="module")
def offload_on(qwen3_gqa_path, prompts, offload_off):  # after offload_off: one engine at a time
    from vllm_asynctls.offload.connector import kv_transfer_config

    return _serve(
        qwen3_gqa_path, *prompts,
        additional_config={"asynctls": {**KNOBS, "offload": True, "offload_hot_blocks": HOT_BLOCKS}},
        kv_transfer_config=kv_transfer_config(),
    )


def test_offload_gives_the_tokens_of_no_offload_at_the_same_budget(offload_on, offload_off):
    for key in ("long", "short"):
        on = [t for t, _ in offload_on[key][0]]
        off = [t for t, _ in offload_off[key][0]]
        assert on == off, f"{key}: offload {on} != no offload {off}"
    long_tokens = [tuple(t) for t, _ in offload_off["long"][0]]
    assert len(set(long_tokens)) == len(long_tokens)  # context-dependent outputs: the equality means something
    _, c = offload_on["long"]
    assert c["offload"] is True and c["offload_blocks_copied"] > 0  # really served through a small hot cache
    # The hot cache is far smaller than each context (per kv head, in tokens).
    assert HOT_BLOCKS * BLOCK * 3 <= min(LONG_LENGTHS)


def test_concurrent_long_requests_complete_with_a_device_cache_smaller_than_their_kv(offload_on, offload_off):
    combined_kv_blocks = sum(math.ceil((n + MAX_TOKENS) / BLOCK) for n in LONG_LENGTHS)
    assert DEVICE_BLOCKS < combined_kv_blocks
    outs, c = offload_on["long"]
    assert len(outs) == len(LONG_LENGTHS)
    for tokens, reason in outs:  # nothing dropped, nothing truncated
        assert len(tokens) == MAX_TOKENS and reason == "length"
    assert c["decode_tokens_sparse"] == len(LONG_LENGTHS) * (MAX_TOKENS - 1)
    # As many decode in the same steps as max_num_seqs allows: their device footprint is the hot cache
    # + two blocks each.
    assert c["max_sparse_decodes_per_step"] == MAX_NUM_SEQS
    # The same device cache without offload cannot hold that many together.
    _, c_off = offload_off["long"]
    assert c_off["offload"] is False
    assert c_off["max_sparse_decodes_per_step"] < MAX_NUM_SEQS


def test_offload_counters(offload_on):
    _, long_c = offload_on["long"]
    _, short_c = offload_on["short"]
    for c in (long_c, short_c):
        assert c["offload_evict_overflow"] == 0
        assert c["offload_steps"] == c["steps_with_sparse"]
        assert c["offload_bytes_per_step"] == pytest.approx(c["offload_bytes_copied"] / c["offload_steps"])
        assert c["offload_exposed_copy_ms"] > 0.0  # CPU copies are synchronous: all exposed
    # 2 layers x 2 kv heads, block 32, head dim 64, float32: one (block, head) of K and V is 16 KiB.
    assert long_c["offload_bytes_copied"] == long_c["offload_blocks_copied"] * 2 * BLOCK * 64 * 4
    # Long contexts through a hot cache far smaller than them: misses on the way.
    assert 0.0 < long_c["offload_hit_rate"] < 0.95
    # The budget covers the short context: only the first decode step misses (cold hot cache).
    assert short_c["decode_tokens_sparse"] == MAX_TOKENS - 1
    assert short_c["offload_hit_rate"] >= 0.9
    assert short_c["offload_hit_rate"] > long_c["offload_hit_rate"]
