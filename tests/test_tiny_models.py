"""The offline fixtures are real, loadable models, and sensitive enough to catch broken attention."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer



def _greedy(model, ids: torch.Tensor, steps: int = 16) -> list[int]:
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("fixture", ["qwen3_gqa_path", "deepseek_mla_path"])
def test_greedy_output_is_varied_and_depends_on_early_tokens(fixture, request):
    path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = "the secret key is 48213 and the river runs north past the blue garden window."
    ids = tok(prompt, return_tensors="pt").input_ids
    base = _greedy(model, ids)
    assert len(set(base)) >= 6, f"greedy output is nearly constant: {base}"

    changed = ids.clone()
    changed[0, 1] = (changed[0, 1] + 17) % model.config.vocab_size  # an early prompt token
    assert _greedy(model, changed) != base, "output does not depend on an early prompt token"


def test_gqa_and_mla_shapes(qwen3_gqa_path, deepseek_mla_path):
    gqa = AutoConfig.from_pretrained(qwen3_gqa_path)
    assert gqa.num_attention_heads // gqa.num_key_value_heads >= 2
    mla = AutoConfig.from_pretrained(deepseek_mla_path)
    assert mla.kv_lora_rank > 0 and mla.qk_rope_head_dim > 0


def test_teacher_student_share_tokenizer_and_differ_in_size(teacher_student_paths):
    teacher, student = teacher_student_paths
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    assert t_tok.get_vocab() == s_tok.get_vocab()
    text = s_tok.apply_chat_template(
        [{"role": "user", "content": "find the key"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    t_cfg, s_cfg = AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student)
    assert t_cfg.vocab_size == s_cfg.vocab_size
    assert (t_cfg.hidden_size, t_cfg.num_hidden_layers) != (s_cfg.hidden_size, s_cfg.num_hidden_layers)
