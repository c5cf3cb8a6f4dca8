"""Tiny random causal LMs and a locally trained tokenizer, built offline in seconds.

Every model here is something a real engine (vLLM's CPU build, transformers) loads from a folder:
a config, safetensors weights and a tokenizer with a chat template. Nothing touches a hub.

Why std 0.3: at the default initialisation (std 0.02) a 2-layer random model emits one repeated
token whatever the context, so a test that compares some attention with dense attention would pass
even if attention were broken. With std around 0.3 greedy outputs are varied and depend on early
prompt tokens; `tests/test_tiny_models.py` asserts exactly that.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

SENSITIVE_INIT_STD = 0.3
VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_WORDS = (
    "the of and to in is was for on that with as by at from his her are be this an which or had "
    "not but were all their one they have has she been there its it if would when who will more "
    "key value pass number find remember secret needle haystack city river mountain blue green red "
    "apple orange table chair window garden music story long short quick slow bright dark open "
    "close first second third north south east west zero two three four five six seven eight nine"
).split()


def _corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 25))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


def build_tokenizer(folder: str | os.PathLike):
    """Train a byte-level BPE tokenizer locally and save it (with a chat template) to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


@dataclass(frozen=True)
class TinyModelSpec:
    """What to build: a transformers model type and the config fields that differ from its defaults."""

    model_type: str
    config: dict = field(default_factory=dict)
    seed: int = 0
    init_std: float = SENSITIVE_INIT_STD
    dtype: str = "float32"

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + f"|v{VOCAB_SIZE}|1"
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


# Qwen3-style GQA: 8 query heads share 2 kv heads (4 per group), head dim 64.
QWEN3_GQA = TinyModelSpec(
    model_type="qwen3",
    config=dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=16384,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
    ),
)

# DeepSeek-V3 family MLA (multi-head latent attention), all layers dense (no MoE). Latent width
# kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576, the one width vLLM's CPU MLA decode kernel serves.
DEEPSEEK_MLA = TinyModelSpec(
    model_type="deepseek_v3",
    config=dict(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=32,
        qk_rope_head_dim=64,
        v_head_dim=64,
        max_position_embeddings=16384,
        rope_scaling=None,
        tie_word_embeddings=False,
    ),
)

# Teacher/student pair for distillation: same tokenizer, different width and depth.
QWEN3_TEACHER = TinyModelSpec(
    model_type="qwen3",
    seed=1,
    config=dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
)
QWEN3_STUDENT = TinyModelSpec(
    model_type="qwen3",
    seed=2,
    config=dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
)


def _build_config(spec: TinyModelSpec, tokenizer):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        spec.model_type,
        vocab_size=len(tokenizer),
        initializer_range=spec.init_std,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec.config,
    )
    cfg.dtype = spec.dtype
    return cfg


def build_model(spec: TinyModelSpec, folder: str | os.PathLike) -> Path:
    """Build the model of `spec` with random weights (std `spec.init_std`) and save it with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = _build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm weights stay at one; every matrix and embedding gets the sensitive std.
            if param.dim() >= 2:
                param.normal_(0.0, spec.init_std)
    model.generation_config.do_sample = False
    model.save_pretrained(str(folder))
    return folder


def cached_model(spec: TinyModelSpec, cache_root: str | os.PathLike | None = None) -> Path:
    """Return a folder holding the model of `spec`, building it once per spec under `cache_root`."""
    root = Path(cache_root or os.environ.get("ASYNCTLS_TIP_TEST_CACHE", Path.home() / ".cache" / "asynctls_tip_tiny"))
    folder = root / f"{spec.model_type}-{spec.digest()}"
    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_model(spec, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            pass
    return folder


def random_prompts(model_path: str | os.PathLike, lengths, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of exactly `lengths` tokens of random text from a tiny model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids: list[int] = []
        while len(ids) < n:
            ids += tok(" ".join(rng.choice(_WORDS) for _ in range(200))).input_ids
        out.append(ids[:n])
    return out
