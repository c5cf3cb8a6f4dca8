"""A real vLLM engine (the CPU build) loads the tiny GQA model and generates what transformers does."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.engine


def test_vllm_engine_generates_the_same_greedy_tokens_as_transformers(qwen3_gqa_path):
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(qwen3_gqa_path)
    prompts = ["the secret key is 48213 and the river", "north south east west blue green red apple"]
    prompt_ids = [tok(p).input_ids for p in prompts]

    llm = LLM(
        model=qwen3_gqa_path,
        dtype="float32",
        max_model_len=1024,
        gpu_memory_utilization=0.3,
        seed=0,
        enforce_eager=True,
    )
    try:
        outs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        )
    finally:
        del llm

    model = AutoModelForCausalLM.from_pretrained(qwen3_gqa_path).eval()
    for ids, out in zip(prompt_ids, outs):
        generated = list(out.outputs[0].token_ids)
        assert len(generated) == 12
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert generated == ref[0, len(ids):].tolist()
