"""TIPTrainer / TIPGKDTrainer on the tiny teacher/student pair: parity with TRL, selection, normalisation, training."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore", message=".*vLLM versions.*")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from trl_tip import (  # noqa: E402
    SELECTION_RULES,
    TIPConfig,
    TIPGKDConfig,
    TIPGKDTrainer,
    TIPTrainer,
    select_tokens,
    selection_counts,
    token_statistics,
)

COMMON = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0)


@pytest.fixture(scope="module")
def pair(teacher_student_paths):
    teacher, student = teacher_student_paths
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    return teacher, student, tokenizer


def load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def prompts(n=4):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"the blue river {i} city"}]} for i in range(n)])


def chats(n=4):
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"find the number {i} north"},
                    {"role": "assistant", "content": "seven green apple table, open window"},
                ]
            }
            for i in range(n)
        ]
    )


def distill_inputs(tokenizer, batch=3, prompt_len=5, completion_len=9, seed=0):
    """A DistillationTrainer micro-batch: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompt_ids = torch.randint(10, vocab, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(10, vocab, (batch, completion_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    completion_mask = torch.ones_like(completion_ids)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = tokenizer.pad_token_id
    completion_mask[0, 6:] = 0
    completion_ids[0, 6:] = tokenizer.pad_token_id
    completion_mask[2, 3:] = 0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def gkd_inputs(tokenizer, batch=3, length=14, prompt_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, len(tokenizer), (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 10:] = 0
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def distill_trainer(cls, config_cls, pair, tmp_path, dtype=torch.float32, **kwargs):
    teacher, student, tokenizer = pair
    settings = dict(COMMON, per_device_train_batch_size=2, max_completion_length=6, gradient_checkpointing=False)
    settings.update(kwargs)
    args = config_cls(str(tmp_path), **settings)
    return cls(
        model=load(student, dtype),
        teacher_model=load(teacher, dtype),
        args=args,
        train_dataset=prompts(),
        processing_class=tokenizer,
    )


def gkd_trainer(cls, config_cls, pair, tmp_path, **kwargs):
    teacher, student, tokenizer = pair
    settings = dict(COMMON, per_device_train_batch_size=2, max_new_tokens=6, max_length=64, gradient_checkpointing=False)
    settings.update(kwargs)
    args = config_cls(str(tmp_path), **settings)
    return cls(
        model=load(student),
        teacher_model=load(teacher),
        args=args,
        train_dataset=chats(),
        processing_class=tokenizer,
    )


def loss_and_grads(trainer, inputs, **kwargs):
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(model, dict(inputs), **kwargs)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_same(result_a, result_b, rtol=1e-5, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = result_a, result_b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def full_logits_reference(trainer, inputs):
    """Completion-aligned full logits of both models, the plain reference of the chunked path."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    completion_len = inputs["completion_ids"].shape[1]
    student = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -completion_len - 1 : -1]
    with torch.no_grad():
        teacher = trainer.teacher_model(input_ids=input_ids, attention_mask=attention_mask).logits
    return student, teacher[:, -completion_len - 1 : -1]


# ---- parity with TRL when every token is selected ----------------------------------------------------------------
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_rule_all_equals_distillation_trainer(pair, tmp_path, beta):
    inputs = distill_inputs(pair[2])
    parent = distill_trainer(DistillationTrainer, DistillationConfig, pair, tmp_path / "p", beta=beta)
    tip = distill_trainer(TIPTrainer, TIPConfig, pair, tmp_path / "t", beta=beta, selection_rule="all")
    assert_same(loss_and_grads(tip, inputs), loss_and_grads(parent, inputs))
    # ... and under TRL's gradient-accumulation normalisation (count passed with the batch)
    counted = dict(inputs, num_items_in_batch=torch.tensor(40.0))
    assert_same(loss_and_grads(tip, counted), loss_and_grads(parent, counted))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_rule_all_equals_gkd_trainer(pair, tmp_path, beta):
    inputs = gkd_inputs(pair[2])
    parent = gkd_trainer(GKDTrainer, GKDConfig, pair, tmp_path / "p", beta=beta)
    tip = gkd_trainer(TIPGKDTrainer, TIPGKDConfig, pair, tmp_path / "t", beta=beta, selection_rule="all")
    assert_same(loss_and_grads(tip, inputs), loss_and_grads(parent, inputs))
    count = torch.tensor(29)
    assert_same(
        loss_and_grads(tip, inputs, num_items_in_batch=count), loss_and_grads(parent, inputs, num_items_in_batch=count)
    )


# ---- the selected loss equals a plain full-logits computation ------------------------------------------------------
@pytest.mark.parametrize("rule,ratio", [("type_aware", 0.5), ("q3", 0.2), ("divergence", 0.5)])
def test_selected_loss_matches_full_logits_reference(pair, tmp_path, rule, ratio):
    tip = distill_trainer(TIPTrainer, TIPConfig, pair, tmp_path, selection_rule=rule, selection_ratio=ratio)
    inputs = distill_inputs(pair[2])
    student_logits, teacher_logits = full_logits_reference(tip, inputs)
    mask = inputs["completion_mask"].bool()
    stats = token_statistics(student_logits.detach(), teacher_logits, mask)
    selected = select_tokens(rule, ratio, *stats, mask)
    assert selected.sum() == selection_counts(mask, ratio, rule).sum()
    log_ps = torch.log_softmax(student_logits.float(), -1)
    log_pt = torch.log_softmax(teacher_logits.float(), -1)
    reverse_kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    reference = reverse_kl[selected].sum() / selected.sum()
    params = [p for p in tip.model.parameters() if p.requires_grad]
    want = (reference.detach(), list(torch.autograd.grad(reference, params)))
    assert_same(loss_and_grads(tip, inputs), want, rtol=2e-4, atol=2e-5)


def test_gkd_selected_loss_matches_full_logits_reference(pair, tmp_path):
    tip = gkd_trainer(TIPGKDTrainer, TIPGKDConfig, pair, tmp_path, selection_rule="type_aware", selection_ratio=0.5)
    inputs = gkd_inputs(pair[2])
    student_logits = tip.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = tip.teacher_model(**{k: inputs[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1]
    mask = inputs["labels"][:, 1:] != -100
    selected = select_tokens("type_aware", 0.5, *token_statistics(student_logits.detach(), teacher_logits, mask), mask)
    log_ps = torch.log_softmax(student_logits, -1)
    log_pt = torch.log_softmax(teacher_logits, -1)
    reference = (log_ps.exp() * (log_ps - log_pt)).sum(-1)[selected].mean()
    params = [p for p in tip.model.parameters() if p.requires_grad]
    want = (reference.detach(), list(torch.autograd.grad(reference, params)))
    assert_same(loss_and_grads(tip, inputs), want, rtol=2e-4, atol=2e-5)


# ---- normalisation under gradient accumulation ---------------------------------------------------------------------
def test_selected_count_normalises_across_micro_batches(pair, tmp_path):
    # `divergence` ranks within each rollout only, so splitting the batch keeps the selection: the two halves,
    # each divided by the whole batch's selected count, must add up to the whole batch's loss and gradients.
    tip = distill_trainer(TIPTrainer, TIPConfig, pair, tmp_path, selection_rule="divergence", selection_ratio=0.5)
    tip.model.train()
    inputs = distill_inputs(pair[2], batch=4)
    total = selection_counts(inputs["completion_mask"], 0.5, "divergence").sum().float()
    whole = loss_and_grads(tip, dict(inputs, num_items_in_batch=total))
    halves = [
        loss_and_grads(tip, {k: v[s] for k, v in inputs.items()} | {"num_items_in_batch": total})
        for s in (slice(0, 2), slice(2, 4))
    ]
    summed = (halves[0][0] + halves[1][0], [a + b for a, b in zip(halves[0][1], halves[1][1])])
    assert_same(summed, whole)


def test_generation_batch_counts_selected_tokens(pair, tmp_path):
    tip = distill_trainer(TIPTrainer, TIPConfig, pair, tmp_path, selection_rule="q3", selection_ratio=0.3)
    batch = tip._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    want = selection_counts(batch["completion_mask"], 0.3, "q3").sum()
    assert batch["num_items_in_batch"].item() == want.item() < batch["completion_mask"].sum().item()


def test_gkd_counts_selected_tokens_of_the_accumulated_batch(pair, tmp_path):
    tip = gkd_trainer(TIPGKDTrainer, TIPGKDConfig, pair, tmp_path, selection_rule="entropy", selection_ratio=0.5)
    batches = [gkd_inputs(pair[2], seed=s) for s in (0, 1)]
    want = sum(selection_counts(b["labels"][:, 1:] != -100, 0.5, "entropy").sum() for b in batches)
    assert tip._get_num_items_in_batch(batches, torch.device("cpu")).item() == want.item()


# ---- empty selection, bf16 ---------------------------------------------------------------------------------------
def test_nothing_to_select_gives_finite_zero_loss(pair, tmp_path):
    tip = distill_trainer(TIPTrainer, TIPConfig, pair, tmp_path / "d", selection_rule="entropy")
    inputs = distill_inputs(pair[2])
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    loss, grads = loss_and_grads(tip, inputs)
    assert loss.item() == 0.0 and all(torch.isfinite(g).all() and not g.any() for g in grads)

    gkd = gkd_trainer(TIPGKDTrainer, TIPGKDConfig, pair, tmp_path / "g", selection_rule="type_aware")
    inputs = gkd_inputs(pair[2])
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    loss, grads = loss_and_grads(gkd, inputs)
    assert loss.item() == 0.0 and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_bf16_models_give_the_fp32_loss_approximately(pair, tmp_path):
    inputs = distill_inputs(pair[2])
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        tip = distill_trainer(
            TIPTrainer, TIPConfig, pair, tmp_path / str(dtype), dtype=dtype, selection_rule="divergence"
        )
        loss, grads = loss_and_grads(tip, inputs)
        assert torch.isfinite(loss) and all(torch.isfinite(g.float()).all() for g in grads)
        losses[dtype] = loss.item()
    assert math.isclose(losses[torch.bfloat16], losses[torch.float32], rel_tol=0.05)


# ---- training end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", SELECTION_RULES)
def test_tip_trainer_trains_on_policy_with_every_rule(pair, tmp_path, rule):
    tip = distill_trainer(
        TIPTrainer,
        TIPConfig,
        pair,
        tmp_path,
        selection_rule=rule,
        selection_ratio=0.5,
        max_steps=1,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
    )
    before = {n: p.detach().clone() for n, p in tip.model.named_parameters()}
    tip.train()
    logs = tip.state.log_history[0]
    assert math.isfinite(logs["loss"]) and logs["loss"] > 0
    assert 0 < logs["tip/share_selected"] <= 1
    assert math.isclose(sum(logs[f"tip/share_q{q}"] for q in (1, 2, 3, 4)), 1.0, rel_tol=1e-6)
    if rule == "all":
        assert logs["tip/share_selected"] == 1.0
    assert any(not torch.equal(before[n], p) for n, p in tip.model.named_parameters())


@pytest.mark.parametrize("rule", SELECTION_RULES)
def test_tip_gkd_trainer_trains_off_policy_with_every_rule(pair, tmp_path, rule):
    tip = gkd_trainer(
        TIPGKDTrainer, TIPGKDConfig, pair, tmp_path, selection_rule=rule, lmbda=0.0, max_steps=1, learning_rate=1e-3
    )
    tip.train()
    logs = tip.state.log_history[0]
    assert math.isfinite(logs["loss"]) and 0 < logs["tip/share_selected"] <= 1


def test_tip_gkd_trainer_trains_on_policy(pair, tmp_path):
    tip = gkd_trainer(
        TIPGKDTrainer,
        TIPGKDConfig,
        pair,
        tmp_path,
        selection_rule="q3",
        selection_ratio=0.2,
        lmbda=1.0,
        max_steps=1,
        gradient_accumulation_steps=2,
    )
    tip.train()
    assert math.isfinite(tip.state.log_history[0]["loss"])


def test_lora_student_trains_one_step(pair, tmp_path):
    from peft import LoraConfig

    teacher, student, tokenizer = pair
    args = TIPConfig(
        str(tmp_path),
        **COMMON,
        per_device_train_batch_size=2,
        max_completion_length=6,
        max_steps=1,
        learning_rate=1e-2,
        selection_rule="type_aware",
    )
    tip = TIPTrainer(
        model=load(student),
        teacher_model=load(teacher),
        args=args,
        train_dataset=prompts(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    trainable = {n: p.detach().clone() for n, p in tip.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in tip.model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    tip.train()
    params = dict(tip.model.named_parameters())
    assert any(not torch.equal(trainable[n], params[n]) for n in trainable)
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)


def test_trainers_require_tip_configs(pair, tmp_path):
    teacher, student, tokenizer = pair
    with pytest.raises(TypeError, match="TIPConfig"):
        TIPTrainer(
            model=load(student),
            teacher_model=load(teacher),
            args=DistillationConfig(str(tmp_path), **COMMON),
            train_dataset=prompts(),
            processing_class=tokenizer,
        )
    # Each trainer takes its own config: the other one's fields differ (max_length, top_p, ...).
    with pytest.raises(TypeError, match="must be a TIPGKDConfig .*got TIPConfig"):
        TIPGKDTrainer(model=load(student), teacher_model=load(teacher), args=TIPConfig(str(tmp_path), **COMMON),
                      train_dataset=prompts(), processing_class=tokenizer)
    with pytest.raises(TypeError, match="must be a TIPConfig .*got TIPGKDConfig"):
        TIPTrainer(model=load(student), teacher_model=load(teacher), args=TIPGKDConfig(str(tmp_path), **COMMON),
                   train_dataset=prompts(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="TIPTrainer needs `teacher_model="):
        TIPTrainer(model=load(student), args=TIPConfig(str(tmp_path), **COMMON), train_dataset=prompts(),
                   processing_class=tokenizer)
    with pytest.raises(ValueError, match="TIPGKDTrainer needs `teacher_model="):
        TIPGKDTrainer(model=load(student), args=TIPGKDConfig(str(tmp_path), **COMMON), train_dataset=prompts(),
                      processing_class=tokenizer)
