"""The plugin inside a real vLLM engine (the CPU build) on the tiny float32 GQA and MLA models.

Engine starts are the cost here (tens of seconds each on a 2-core machine), so the file uses seven:
the default backend, asynctls and asynctls with lagged selection on the GQA model, the same three on
the MLA model (CPU_MLA as the default), and the OpenAI-compatible server with asynctls. Each engine carries several checks.

What is shown:
- `--attention-backend asynctls` selects our backend in an unmodified vLLM (counters move only if our
  code serves the decode tokens).
- GQA: with the token budget covering the context, greedy tokens equal the default backend's,
  token for token, on prompts of several lengths, in one batch that also holds a long sparse
  request (so dense-threshold decodes, exact sparse decodes, real sparse decodes and chunked prefill
  of the long prompt are mixed in the same steps).
- A small budget on a ~2.5K-token prompt: the sparse path is taken (counters), reads a bounded
  number of tokens, and generation completes; a second identical batch served from the prefix cache
  (summaries live with the physical blocks) gives the same tokens.
- MLA (latent 512 + rope 64 = 576, the width CPU_MLA's decode kernel serves): the same equality
  against CPU_MLA on 20/300/1500-token prompts (300 and 1500 decoded through our sparse path:
  absorbed query, one kv head, value = the latent part of the cache), one request at a time because
  vLLM's CPU MLA prefill is batch-dependent (see `_generate_one_by_one`); a batch mixing a
  dense-threshold decode, covered and really sparse decodes serves; alone, the 2.5K request reads a
  bounded set.
- Lagged selection (`lagged_selection`), GQA and MLA: covered contexts still equal the default
  backend token for token, and in every layer each sparse step after a request's first read the block
  choice its previous step recorded.
- An index calibration file (`index_calibration_file`, on the lagged engine): every layer serves with
  the file's channels for its layer number; a file made for other shapes fails `LLM(...)` at start-up.
- Bad knobs fail `LLM(...)` at start-up with the knob's name, before any engine process starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_models import random_prompts
from vllm_engines import shutdown_engine

# Counters are read from the worker with `llm.collective_rpc(read_counters)`; vLLM only ships a
# callable to its workers when this is set (it falls back to cloudpickle).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

pytestmark = pytest.mark.engine

ENGINE_KW = dict(
    dtype="float32",
    gpu_memory_utilization=0.3,
    max_model_len=4096,
    enforce_eager=True,
    seed=0,
)
MAX_TOKENS = 20
SHORT_LENGTHS = (20, 150, 400, 500)  # + generated tokens all <= sinks + local + budget = 544
LONG_LENGTH = 2500
# Budget 512 (+16 sinks +16 local) covers every short prompt's context; 2.5K contexts are really sparse.
GQA_KNOBS = dict(
    token_budget=512, num_blocks=32, selection_block_size=16, sink_tokens=16, local_tokens=16,
    index_bits=4, dense_threshold=256,
)
# MLA: budget 1536 (+16 sinks +16 local) covers the 20/300/1500-token prompts plus their generated
# tokens; the 2.5K prompt is really sparse. Contexts above 64 take the sparse path.
MLA_SHORT_LENGTHS = (20, 300, 1500)
MLA_KNOBS = dict(
    token_budget=1536, num_blocks=96, selection_block_size=16, sink_tokens=16, local_tokens=16,
    index_bits=4, dense_threshold=64,
)
MLA_ATTENDED_MAX = 16 + 16 + 1536
ATTENDED_MAX = 16 + 16 + 512


def _generate(llm, prompts, max_tokens=MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def _counters(llm) -> dict:
    from vllm_asynctls.counters import read_counters

    (snapshot,) = llm.collective_rpc(read_counters)
    return snapshot


def _reset_counters(llm) -> None:
    from vllm_asynctls.counters import reset_counters

    llm.collective_rpc(reset_counters)


# ----------------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gqa_prompts(qwen3_gqa_path):
    return random_prompts(qwen3_gqa_path, (*SHORT_LENGTHS, LONG_LENGTH))


@pytest.fixture(scope="module")
def gqa_default_tokens(qwen3_gqa_path, gqa_prompts):
    """Greedy tokens of vLLM's default CPU backend on the same batch."""
    from vllm import LLM

    llm = LLM(model=qwen3_gqa_path, max_num_batched_tokens=1024, **ENGINE_KW)
    try:
        return _generate(llm, gqa_prompts)
    finally:
        shutdown_engine(llm)


@pytest.fixture(scope="module")
def gqa_runs(qwen3_gqa_path, gqa_prompts, gqa_default_tokens):
    """Everything the GQA checks need from one asynctls engine, which is shut down afterwards
    (depends on gqa_default_tokens so the default engine is gone before this one starts)."""
    from vllm import LLM

    llm = LLM(
        model=qwen3_gqa_path,
        attention_backend="asynctls",
        additional_config={"asynctls": GQA_KNOBS},
        max_num_batched_tokens=1024,  # the long prompt prefills in chunks, beside decodes
        enable_prefix_caching=True,
        **ENGINE_KW,
    )
    try:
        runs = {}
        _reset_counters(llm)
        runs["first"] = (_generate(llm, gqa_prompts), _counters(llm))
        # Same batch again: every full cache block of the prompts now comes from the prefix cache,
        # with the block summaries written during the first run.
        _reset_counters(llm)
        runs["again"] = (_generate(llm, gqa_prompts), _counters(llm))
        # The long request alone: every decode token sparse.
        _reset_counters(llm)
        runs["alone"] = (_generate(llm, gqa_prompts[-1:], max_tokens=8), _counters(llm))
        return runs
    finally:
        shutdown_engine(llm)


def test_gqa_budget_covering_context_equals_default_backend(gqa_runs, gqa_default_tokens):
    tokens, _ = gqa_runs["first"]
    for length, ours, default in zip(SHORT_LENGTHS, tokens, gqa_default_tokens):
        assert ours == default, f"prompt of {length} tokens: asynctls {ours} != default {default}"
    # The outputs depend on the prompt (an equality on a constant model would prove nothing).
    assert len({tuple(t) for t in gqa_default_tokens}) == len(gqa_default_tokens)


def test_gqa_decode_dispatch_dense_below_threshold_sparse_above(gqa_runs):
    _, c = gqa_runs["first"]
    # 20- and 150-token prompts decode at contexts <= 256: dense (CPU_ATTN).
    assert c["decode_tokens_dense"] == 2 * (MAX_TOKENS - 1)
    # 400, 500 and 2500-token prompts decode sparse.
    assert c["decode_tokens_sparse"] == 3 * (MAX_TOKENS - 1)
    assert c["tokens_read_per_sparse_decode"] <= ATTENDED_MAX
    assert c["tokens_read_per_dense_decode"] < 256


def test_gqa_prefix_cache_keeps_block_summaries(gqa_runs, gqa_prompts):
    first, _ = gqa_runs["first"]
    again, c = gqa_runs["again"]
    assert c["prefill_tokens"] < sum(len(p) for p in gqa_prompts)  # prefix cache hits
    assert again == first


def test_gqa_small_budget_long_prompt_takes_sparse_path(gqa_runs):
    (alone,), c = gqa_runs["alone"]
    assert len(alone) == 8
    assert c["decode_tokens_sparse"] == 7 and c["decode_tokens_dense"] == 0 and c["sparse_share"] == 1.0
    assert c["context_per_sparse_decode"] > LONG_LENGTH
    # Sinks + local window + the budget (a little less when a kept block holds fewer candidates).
    assert 0.9 * ATTENDED_MAX <= c["tokens_read_per_sparse_decode"] <= ATTENDED_MAX
    assert c["tokens_read_per_sparse_decode"] < c["context_per_sparse_decode"] / 4


@pytest.fixture(scope="module")
def gqa_calibration_file(qwen3_gqa_path, tmp_path_factory):
    """An index calibration file of the tiny GQA model (16 channels, other prompts than the test's)."""
    from transformers import AutoModelForCausalLM

    from vllm_asynctls.calibration import calibrate_index_channels

    model = AutoModelForCausalLM.from_pretrained(qwen3_gqa_path, dtype="float32").eval()
    cal = calibrate_index_channels(model, random_prompts(qwen3_gqa_path, (600, 300), seed=7), 16, progress=False)
    return str(cal.save(tmp_path_factory.mktemp("calibration") / "channels.json"))


@pytest.fixture(scope="module")
def gqa_lagged_runs(qwen3_gqa_path, gqa_prompts, gqa_runs, gqa_calibration_file):
    """The GQA batch again with lagged selection (after the plain asynctls engine is gone). This engine
    also takes its index channels from a calibration file (`index_calibration_file`)."""
    from vllm import LLM

    from vllm_asynctls.calibration import index_channels_in_use
    from vllm_asynctls.lagged_state import lagged_state_summary

    llm = LLM(
        model=qwen3_gqa_path,
        attention_backend="asynctls",
        additional_config={"asynctls": dict(GQA_KNOBS, lagged_selection=True, index_channels=16,
                                            index_calibration_file=gqa_calibration_file)},
        max_num_batched_tokens=1024,
        **ENGINE_KW,
    )
    try:
        _reset_counters(llm)
        tokens = _generate(llm, gqa_prompts)
        return tokens, _counters(llm), llm.apply_model(lagged_state_summary), llm.apply_model(index_channels_in_use)
    finally:
        shutdown_engine(llm)


def test_gqa_lagged_selection_carries_block_choices_and_stays_exact_when_covered(gqa_lagged_runs,
                                                                                  gqa_default_tokens):
    tokens, c, (layers,), _ = gqa_lagged_runs
    # Covered contexts: each lagged step selects inside the previous step's blocks (the first one
    # inside the most recent blocks) and still equals the default backend, token for token.
    for length, ours, default in zip(SHORT_LENGTHS, tokens, gqa_default_tokens):
        assert ours == default, f"prompt of {length} tokens: lagged asynctls {ours} != default {default}"
    sparse = c["decode_tokens_sparse"]
    assert sparse == 3 * (MAX_TOKENS - 1)
    assert c["tokens_read_per_sparse_decode"] <= ATTENDED_MAX
    # In every layer, each sparse decode step after a request's first read the choice its previous
    # step recorded (whatever batch row the request sat in), and the state holds the long request's
    # last step (seq_len = prompt + generated - 1).
    assert len(layers) == 2, layers
    for layer in layers:
        assert layer["hits"] == sparse - 3, layer
        assert layer["longest_recorded"] == LONG_LENGTH + MAX_TOKENS - 1, layer
    assert len(tokens[-1]) == MAX_TOKENS


def test_gqa_layers_serve_with_the_calibration_files_channels(gqa_lagged_runs, gqa_calibration_file):
    from vllm_asynctls.calibration import load_calibration

    *_, (in_use,) = gqa_lagged_runs
    cal = load_calibration(gqa_calibration_file)
    assert [[tuple(h) for h in layer] for layer in in_use] == [list(layer) for layer in cal.layers]
    # The equality can fail: no layer's entry is the index's unset default (the first 16 channels), and
    # the layers' entries differ, so a layer served with another layer's entry would not match.
    assert all(layer != tuple(tuple(range(16)) for _ in layer) for layer in cal.layers)
    assert len(set(cal.layers)) == len(cal.layers)


def test_calibration_file_for_other_shapes_fails_engine_start(qwen3_gqa_path, gqa_calibration_file):
    from vllm import LLM

    with pytest.raises(ValueError, match=r"asynctls knob index_calibration_file '.*': the file has index_channels 16; "
                                         r"this model has 32"):
        LLM(model=qwen3_gqa_path, attention_backend="asynctls",
            additional_config={"asynctls": {"index_calibration_file": gqa_calibration_file}}, **ENGINE_KW)


# ----------------------------------------------------------------------------------------------
# Start-up errors (no engine process starts)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"token_budget": 0}, r"token_budget must be an int >= 1; got 0"),
        ({"selection_block_size": 256}, r"selection_block_size must divide the KV cache block size 128; got 256"),
        ({"index_channels": 80}, r"index_channels must be in \[1, 64\]"),
        ({"dense_threshold": -3}, r"dense_threshold must be an int >= 0"),
        ({"budget": 5}, r"unknown asynctls knob"),
    ],
)
def test_bad_knobs_fail_engine_start_with_their_name(qwen3_gqa_path, knobs, match):
    from vllm import LLM

    with pytest.raises(ValueError, match=match):
        LLM(model=qwen3_gqa_path, attention_backend="asynctls", additional_config={"asynctls": knobs}, **ENGINE_KW)


def test_mla_dense_threshold_needs_the_cpu_mla_kernel_width():
    # vLLM's CPU MLA decode kernel (the dense path) serves latent + rope = 576 only; other widths must
    # decode every token through the sparse path. (The tiny MLA model is 576 wide, so no engine here.)
    from vllm_asynctls._vllm_compat import check_cpu_mla_dense_threshold

    check_cpu_mla_dense_threshold(576, 100)
    check_cpu_mla_dense_threshold(96, 0)
    with pytest.raises(ValueError, match=r"dense_threshold must be 0 for this model.*576.*96"):
        check_cpu_mla_dense_threshold(96, 100)


# ----------------------------------------------------------------------------------------------
# MLA
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mla_prompts(deepseek_mla_path):
    return random_prompts(deepseek_mla_path, (*MLA_SHORT_LENGTHS, LONG_LENGTH), seed=1)


def _generate_one_by_one(llm, prompts) -> list[list[int]]:
    """Each prompt as its own request, so every engine step holds exactly one request. vLLM 0.32's
    CPU MLA *prefill* (CPU_MLA's, used by both engines) gives batch-dependent results on this model
    (the 300-token prompt's first token differs alone vs. batched with others), and which requests
    share a step depends on when they reach the engine process; one request at a time makes both
    engines run the same steps."""
    return [_generate(llm, [p])[0] for p in prompts]


@pytest.fixture(scope="module")
def mla_default_tokens(deepseek_mla_path, mla_prompts, gqa_runs):
    """Greedy tokens of vLLM's default CPU MLA backend (CPU_MLA) on the covered prompts (after the GQA
    engines are gone, fixture order)."""
    from vllm import LLM

    llm = LLM(model=deepseek_mla_path, **ENGINE_KW)
    try:
        return _generate_one_by_one(llm, mla_prompts[: len(MLA_SHORT_LENGTHS)])
    finally:
        shutdown_engine(llm)


@pytest.fixture(scope="module")
def mla_runs(deepseek_mla_path, mla_prompts, mla_default_tokens):
    # After the default MLA engine is gone (fixture order), then shut down itself.
    from vllm import LLM

    llm = LLM(model=deepseek_mla_path, attention_backend="asynctls",
              additional_config={"asynctls": MLA_KNOBS}, **ENGINE_KW)
    try:
        runs = {}
        _reset_counters(llm)
        runs["covered"] = (_generate_one_by_one(llm, mla_prompts[: len(MLA_SHORT_LENGTHS)]), _counters(llm))
        # All four in one batch: dense-threshold decodes, covered sparse decodes and a really sparse
        # decode share steps (the mixed split of MLA's decode rows).
        _reset_counters(llm)
        runs["batch"] = (_generate(llm, mla_prompts), _counters(llm))
        # The long request alone: every decode token sparse, reads bounded by the budget.
        _reset_counters(llm)
        runs["alone"] = (_generate(llm, mla_prompts[-1:], max_tokens=8), _counters(llm))
        return runs
    finally:
        shutdown_engine(llm)


def test_mla_budget_covering_context_equals_default_backend(mla_runs, mla_default_tokens):
    tokens, c = mla_runs["covered"]
    for length, ours, default in zip(MLA_SHORT_LENGTHS, tokens, mla_default_tokens):
        assert ours == default, f"prompt of {length} tokens: asynctls {ours} != default {default}"
    assert len({tuple(t) for t in mla_default_tokens}) == len(mla_default_tokens)
    # 20-token prompt: contexts <= 64 decode dense (CPU_MLA's kernel); 300 and 1500: our sparse path,
    # which with the budget covering the context reads every token.
    assert c["decode_tokens_dense"] == MAX_TOKENS - 1
    assert c["decode_tokens_sparse"] == 2 * (MAX_TOKENS - 1)
    assert c["tokens_read_per_sparse_decode"] == c["context_per_sparse_decode"] > 300


def test_mla_mixed_batch_splits_decode_rows_dense_and_sparse(mla_runs):
    tokens, c = mla_runs["batch"]
    assert [len(t) for t in tokens] == [MAX_TOKENS] * 4
    assert len({tuple(t) for t in tokens}) == 4
    assert c["decode_tokens_dense"] == MAX_TOKENS - 1 and c["decode_tokens_sparse"] == 3 * (MAX_TOKENS - 1)
    assert c["tokens_read_per_sparse_decode"] < c["context_per_sparse_decode"]  # the 2.5K one is sparse


def test_mla_small_budget_long_prompt_takes_sparse_path(mla_runs):
    (alone,), c = mla_runs["alone"]
    assert len(alone) == 8
    assert c["decode_tokens_sparse"] == 7 and c["decode_tokens_dense"] == 0
    assert c["context_per_sparse_decode"] > LONG_LENGTH
    assert 0.9 * MLA_ATTENDED_MAX <= c["tokens_read_per_sparse_decode"] <= MLA_ATTENDED_MAX


@pytest.fixture(scope="module")
def mla_lagged_runs(deepseek_mla_path, mla_prompts, mla_runs):
    """The covered MLA prompts with lagged selection (after the plain asynctls MLA engine is gone), the
    index in each layer's principal directions (`index_basis="pca"`)."""
    from vllm import LLM

    from vllm_asynctls.calibration import index_bases_in_use
    from vllm_asynctls.lagged_state import lagged_state_summary

    llm = LLM(model=deepseek_mla_path, attention_backend="asynctls",
              additional_config={"asynctls": dict(MLA_KNOBS, lagged_selection=True, index_basis="pca")},
              **ENGINE_KW)
    try:
        tokens = _generate_one_by_one(llm, mla_prompts[: len(MLA_SHORT_LENGTHS)])
        return tokens, llm.apply_model(lagged_state_summary), llm.apply_model(index_bases_in_use)
    finally:
        shutdown_engine(llm)


def test_mla_lagged_selection_carries_block_choices_and_stays_exact_when_covered(mla_lagged_runs,
                                                                                  mla_default_tokens):
    tokens, (layers,), (bases,) = mla_lagged_runs
    for length, ours, default in zip(MLA_SHORT_LENGTHS, tokens, mla_default_tokens):
        assert ours == default, f"prompt of {length} tokens: lagged asynctls {ours} != default {default}"
    # Both layers calibrated a basis over the latent + rope key at their first real write.
    assert len(bases) == 2 and all(b is not None and b[1] == b[2] and b[0] == 1 for b in bases), bases
    # The 300- and 1500-token prompts decode sparse (contexts above 64): every step after each one's
    # first read the choice its previous step recorded, in both layers.
    assert len(layers) == 2, layers
    for layer in layers:
        assert layer["hits"] == 2 * (MAX_TOKENS - 2), layer
        assert layer["longest_recorded"] == MLA_SHORT_LENGTHS[-1] + MAX_TOKENS - 1, layer


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible server
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_openai_server_with_asynctls_answers_completions_and_chat(qwen3_gqa_path, mla_runs, tmp_path):
    # Requests mla_runs only to run after the in-process engines are gone.
    port = _free_port()
    counters_file = tmp_path / "counters.json"
    # INFO: the start-up lines are checked below, and importing trl (other tests do) sets
    # VLLM_LOGGING_LEVEL=ERROR in this process's environment, which the server would inherit.
    env = dict(os.environ, VLLM_ASYNCTLS_COUNTERS_FILE=str(counters_file), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_LOGGING_LEVEL="INFO")
    knobs = {"asynctls": {**GQA_KNOBS, "dense_threshold": 0}}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", qwen3_gqa_path,
        "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
        "--attention-backend", "AsyncTLS", "--additional-config", json.dumps(knobs),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--gpu-memory-utilization", "0.3",
    ]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + (tmp_path / "server.log").read_text()[-4000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("server not healthy in 180 s:\n" + (tmp_path / "server.log").read_text()[-4000:])
            time.sleep(1)
        comp = _post(base + "/v1/completions",
                     {"model": "tiny", "prompt": "the city of blue river and the key " * 20, "max_tokens": 8,
                      "temperature": 0})
        assert comp["choices"][0]["text"] and comp["usage"]["completion_tokens"] == 8
        chat = _post(base + "/v1/chat/completions",
                     {"model": "tiny", "messages": [{"role": "user", "content": "find the secret number " * 10}],
                      "max_tokens": 8, "temperature": 0})
        assert chat["choices"][0]["message"]["content"] is not None
        assert chat["usage"]["completion_tokens"] == 8
        files = list(tmp_path.glob("counters.json.*"))
        files = [f for f in files if not f.name.endswith(".tmp")]
        assert files, "no worker wrote asynctls counters"
        c = json.loads(Path(files[0]).read_text())
        assert c["decode_tokens_sparse"] >= 14 and c["decode_tokens_dense"] == 0
        # The plugin logs under vLLM's logger, so its start-up lines reach the server's log: the
        # worker's backend and the knobs as given.
        server_log = (tmp_path / "server.log").read_text()
        assert "asynctls: using vllm_asynctls.backend.AsyncTLSAttentionBackend" in server_log
        assert f"token_budget={GQA_KNOBS['token_budget']}, num_blocks={GQA_KNOBS['num_blocks']}" in server_log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
