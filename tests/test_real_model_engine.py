"""The real model through the real engine: on a 4K passkey prompt asynctls answers what dense answers."""

import pytest

pytestmark = pytest.mark.engine

TOKEN_BUDGET = 1024  # a quarter of the context


@pytest.fixture(scope="module")
def smollm2_path():
    pytest.importorskip("gguf")
    from vllm_asynctls.evaluation.real_model import smollm2_checkpoint

    return str(smollm2_checkpoint())


def _generate(path, prompt_ids, max_model_len, **engine_kwargs):
    from vllm import LLM, SamplingParams

    from vllm_asynctls.counters import read_counters

    llm = LLM(model=path, dtype="float32", max_model_len=max_model_len, gpu_memory_utilization=0.3, seed=0,
              enforce_eager=True, **engine_kwargs)
    try:
        out = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                           SamplingParams(max_tokens=10, temperature=0.0))
        counters = llm.collective_rpc(read_counters)[0] if engine_kwargs else None
    finally:
        del llm
    return [list(o.outputs[0].token_ids) for o in out], counters


def test_passkey_at_4k_asynctls_answers_what_dense_answers(smollm2_path, monkeypatch):
    from transformers import AutoTokenizer

    from vllm_asynctls.evaluation.long_context_suite import build_sample

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    sample = build_sample(tok, "passkey", 4096, depth=0.5, seed=0)
    ids = tok(sample.prompt, add_special_tokens=False).input_ids
    assert 3800 <= len(ids) <= 4096
    max_model_len = len(ids) + 32

    dense, _ = _generate(smollm2_path, [ids], max_model_len)
    knobs = dict(token_budget=TOKEN_BUDGET, num_blocks=2 * TOKEN_BUDGET // 16, selection_block_size=16,
                 sink_tokens=16, local_tokens=64, dense_threshold=0)
    sparse, counters = _generate(smollm2_path, [ids], max_model_len, attention_backend="asynctls",
                                 additional_config={"asynctls": knobs})

    assert sample.score(tok.decode(dense[0])) == 1.0, "dense must find the key for the comparison to mean anything"
    assert sparse == dense
    assert counters["decode_tokens_sparse"] >= len(sparse[0]) - 1 and counters["decode_tokens_dense"] == 0
    assert counters["tokens_read_per_sparse_decode"] <= 16 + 64 + TOKEN_BUDGET < len(ids) / 3
