"""asynctls inside real vLLM on a GPU: a correctness check against vLLM's dense backends, then long-context
decode throughput against vLLM's default backend (FlashAttention 3, CUDA graphs), same machine.

    python benchmarks/bench_vllm_e2e.py --stage check --out OUT       # small model, ~5 engine starts
    python benchmarks/bench_vllm_e2e.py --stage check --runs asynctls_cover,asynctls_cover_nograph --out OUT
    python benchmarks/bench_vllm_e2e.py --stage check --runs asynctls_cover,asynctls_cover_tp2,flash_attn,flash_attn_tp2 --out OUT  # 2 GPUs
    python benchmarks/bench_vllm_e2e.py --stage dense --out OUT       # Qwen3-8B shapes, default backend
    python benchmarks/bench_vllm_e2e.py --stage asynctls --out OUT    # same shapes, budgets 2048 and 1024
    python benchmarks/bench_vllm_e2e.py --stage check --runs mla_triton,mla_asynctls_cover,mla_asynctls_256 --out OUT
    python benchmarks/bench_vllm_e2e.py --stage dense --model-shapes deepseek-v2-lite --out OUT2  # MLA (then asynctls)
    python benchmarks/bench_vllm_e2e.py --stage dense --model-shapes llama-3.2-1b --weights random --out O3  # hd 64
    python benchmarks/bench_vllm_e2e.py --stage check --runs hd64_flash_attn,hd64_triton_attn,hd64_asynctls_cover

Each engine runs in its own subprocess (vLLM's shutdown can hang; a fresh process frees the GPU).
Results are JSON files in OUT; `--stage report` turns them into the table of `benchmarks/RESULTS.md`.

check: a 4-layer Qwen3-shaped model with random weights (std 0.3, built here with transformers and
    saved in bf16; no download), 4 prompts of 3,000 tokens and one of 100, greedy, 24 tokens with
    logprobs. Engines: FLASH_ATTN and TRITON_ATTN (the dense-vs-dense spread), asynctls with a budget
    covering the context (must agree with FLASH_ATTN within that spread), the same eager
    (`enforce_eager=True`, which also drops torch.compile), the same compiled without CUDA graphs
    (`cudagraph_mode=NONE`: isolates graph capture), asynctls at a 256-token budget (must have run
    sparse: its counters), and on 2 GPUs asynctls and FLASH_ATTN at tensor parallelism 2.
    The `hd64_*` runs check head dim 64 on a 4-layer Llama-shaped model (16 q / 4 kv heads): FLASH_ATTN (the
    reference), TRITON_ATTN (the spread), asynctls covering (graphs; lagged) and at a 256-token budget.
    The `mla_*` runs do the same for MLA on a 4-layer DeepSeek-V3-shaped model (latent 512 + rope 64)
    against TRITON_MLA (the GPU MLA backend's parent), with vLLM's default MLA backend as the spread.
    `*_kv_bf16`: the covering runs with `kv_cache_dtype="bfloat16"` (the model dtype named), against 'auto'.
    `*_fp8`: `kv_cache_dtype="fp8"` (e4m3, per-tensor scales) against FLASH_ATTN on the same fp8 cache
    (`flash_attn_fp8`, itself compared with bf16 FLASH_ATTN: the quantisation's spread); `*_fp8_scaled` the
    same with non-unit q / k / v scales set on every layer before the first prompt. `mla_*_fp8` likewise
    against TRITON_MLA on the same cache (`mla_triton_fp8`); `mla_triton_kv_bf16` is TRITON_MLA with the
    model dtype named, against its 'auto' run.
    `--runs asynctls_256_calibrated`: the 256-token run with index channels from a calibration file
    made first on the GPU (`vllm_asynctls.calibration`); the summary says whether every layer served
    with the file's channels.
throughput: Qwen3-8B shapes (36 layers, 32 q / 8 kv heads, head dim 128), dummy weights, bf16,
    contexts 32K / 64K / 96K, as many requests as the KV cache holds (at most 16; `--max-seqs`). Each context:
    one prefill-only pass fills the prefix cache, then two runs of 8 and 72 new tokens reuse it;
    decode rate = requests x 64 / (t72 - t8) (`--decode-lengths 8,40,72,136` times more runs, each
    recorded, the rate still from the shortest and longest); every run adds its requests and steps
    `LLMEngine.step()` until they finish, as `LLM.generate` does, timing each step too. Then the longest run
    once more on its own: requests / its median step is the second rate in the report, which one slow step
    cannot move (a run that takes a second longer than its repeats shifts the first rate by up to tens of
    percent; RESULTS, 2026-11-27: with every run stepped, GLM's runs on an H200 parted at their first step, the
    prefix-cache hits of 64 prompts of 32K, which varied by 0.7 s, while their decode steps agreed). asynctls
    gets the same KV-cache bytes as the dense run (`kv_cache_memory_bytes`), out of which the plugin reserves
    its index, so the comparison is at equal memory. On Qwen3-8B's shapes vLLM's dummy weights (uniform +-1e-3, the same values in q_norm and
    k_norm) make q and k so small that every block and token score of a row is the same float: the selection
    then degenerates to the lowest-indexed blocks and its top-ks end in one pass (other shapes' dummy
    selections were not examined: quote `--weights random` for a real one). `--weights random`
    re-initialises the loaded model in place before the first prompt (`LLM.apply_model`: matrices and
    embeddings N(0, 0.02), norm weights 1), so q.k / sqrt(d) is of order one and the selection is real.
    `--model-shapes llama-3.2-1b`: the GQA runs at Llama-3.2-1B's shapes (16 layers, 32 q / 8 kv heads of 64).
    `--model-shapes deepseek-v2-lite`: the throughput runs for an MLA model (DeepSeek-V2-Lite's attention,
    dense MLPs) against vLLM's default MLA backend (FLASH_ATTN_MLA in the H200 runs; the dense stage records
    the backends vLLM logs in `tput_dense.json`); `glm-4.7-flash`: GLM-4.7-Flash's attention (20 heads on the
    latent, 47 layers), dense MLPs, likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
G_SHORT, G_LONG = 8, 72
MAX_SEQS = 16
RATE_DISAGREEMENT = 0.10  # report: largest relative gap tolerated between the two step times (or ratios)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token takes over all layers: K and V of a GQA config, the latent row
    (kv_lora_rank + qk_rope_head_dim) of an MLA one."""
    if "kv_lora_rank" in cfg:
        return cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * dtype_bytes
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * dtype_bytes


def qwen3_8b_config_dir(root: Path, max_positions: int) -> Path:
    """config.json of Qwen3-8B's shapes (no weights: vLLM's dummy load format)."""
    folder = root / "qwen3-8b-shapes"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": max_positions, "rope_theta": 1000000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16",
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def llama_3_2_1b_config_dir(root: Path, max_positions: int) -> Path:
    """config.json of Llama-3.2-1B's shapes (16 layers, 32 q / 8 kv heads of 64, llama3 rope scaling; from its
    config.json), no weights: vLLM's dummy load format. The GQA row at head dim 64."""
    folder = root / "llama-3.2-1b-shapes"
    folder.mkdir(parents=True, exist_ok=True)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": max_positions, "rope_theta": 500000.0, "rope_parameters": rope,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "dtype": "bfloat16",
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def _dense_mla_config_dir(root: Path, name: str, max_positions: int, **shapes) -> Path:
    """config.json of an MLA model in vLLM's DeepSeek architecture with every layer's MLP dense
    (`first_k_dense_replace` = all layers: the vLLM kit on the GPU machine lacks vLLM's MoE kernels), the
    attention and MLP shapes from `shapes`; no weights: vLLM's dummy load format."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0,
        "scoring_func": "softmax", "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "max_position_embeddings": max_positions, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        **shapes,
    }
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg["first_k_dense_replace"] = cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def deepseek_v2_lite_config_dir(root: Path, max_positions: int) -> Path:
    """DeepSeek-V2-Lite's attention shapes (MLA: 16 heads, latent 512 + rope 64, 27 layers) with every MLP
    dense at 10,944 wide (about its 8 active experts' 8 x 1,408)."""
    return _dense_mla_config_dir(
        root, "deepseek-v2-lite-shapes", max_positions,
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, norm_topk_prob=False, q_lora_rank=None, qk_nope_head_dim=128,
        v_head_dim=128, vocab_size=102400, rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=100000,
        eos_token_id=100001)


def glm_4_7_flash_config_dir(root: Path, max_positions: int) -> Path:
    """GLM-4.7-Flash's attention shapes (MLA: 20 heads, latent 512 + rope 64, nope 192, v 256, q_lora_rank
    768, 47 layers, hidden 2,048; from its config.json) in vLLM's DeepSeek-V3 architecture (the same MLA
    layers as its own `Glm4MoeLiteForCausalLM`, which needs a MoE layer; transformers' DeepSeek-V2 config
    refuses 20 heads on a hidden size of 2,048), with every MLP dense at 7,680 wide (its 4 active experts
    and 1 shared expert of 1,536)."""
    return _dense_mla_config_dir(
        root, "glm-4.7-flash-shapes", max_positions,
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=2048, intermediate_size=7680,
        moe_intermediate_size=1536, num_hidden_layers=47, num_attention_heads=20, n_routed_experts=64,
        n_shared_experts=1, num_experts_per_tok=4, norm_topk_prob=True, q_lora_rank=768, qk_nope_head_dim=192,
        v_head_dim=256, vocab_size=154880, rope_theta=1000000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)


THROUGHPUT_MODELS = {"qwen3-8b": qwen3_8b_config_dir, "llama-3.2-1b": llama_3_2_1b_config_dir,
                     "deepseek-v2-lite": deepseek_v2_lite_config_dir, "glm-4.7-flash": glm_4_7_flash_config_dir}


def _tiny_model_dir(root: Path, model_type: str, **config) -> Path:
    """A bf16 model of `model_type` with `config`'s fields and random weights, built once under `root`
    (`tests/tiny_models.py`)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import TinyModelSpec, cached_model

    return cached_model(TinyModelSpec(model_type=model_type, dtype="bfloat16", config=config), root)


def small_model_dir(root: Path) -> Path:
    """The GQA check model: 4 Qwen3 layers, 16 q / 4 kv heads of 128, random weights."""
    return _tiny_model_dir(root, "qwen3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=16384,
                           rope_theta=1_000_000.0, tie_word_embeddings=False)


def small_hd64_model_dir(root: Path) -> Path:
    """A 4-layer Llama-shaped model at head dim 64 (16 q / 4 kv heads: Llama-3.2-1B's group of 4), random
    weights, built like the GQA check model: the `hd64_*` runs check the head-dim-64 decode plans in vLLM."""
    return _tiny_model_dir(root, "llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=16384,
                           rope_theta=500_000.0, tie_word_embeddings=False)


def small_mla_model_dir(root: Path) -> Path:
    """A 4-layer DeepSeek-V3-shaped MLA model (latent 512 + rope 64, 16 heads, no MoE layer), random
    weights, built like the GQA check model."""
    return _tiny_model_dir(root, "deepseek_v3", hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                           num_hidden_layers=4, first_k_dense_replace=4, n_routed_experts=4, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=16,
                           num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                           qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=16384, rope_scaling=None,
                           tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------
# engine workers (one per subprocess)
# ------------------------------------------------------------------------------------------------


def _llm(model: str, backend: str, knobs: dict | None, **kw):
    from vllm import LLM

    args = dict(model=model, dtype="bfloat16", seed=0, **kw)
    if backend == "asynctls":
        args.update(attention_backend="asynctls", additional_config={"asynctls": knobs or {}})
    elif backend != "default":
        args.update(attention_backend=backend)
    return LLM(**args)


def worker_check(a) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(a.prompts).read_text())
    extra = {"compilation_config": {"cudagraph_mode": a.cudagraph_mode}} if a.cudagraph_mode else {}
    if a.kv_cache_dtype:
        extra["kv_cache_dtype"] = a.kv_cache_dtype
    llm = _llm(a.model, a.backend, json.loads(a.knobs) if a.knobs else None, max_model_len=4096,
               gpu_memory_utilization=0.3, max_num_seqs=8, enable_prefix_caching=False,
               enforce_eager=a.eager, block_size=16, tensor_parallel_size=a.tp, **extra)
    if a.kv_scales:
        import functools

        from vllm_asynctls.evaluation.kv_scales import set_kv_scales

        q, k, v = (float(x) for x in a.kv_scales.split(","))
        changed = llm.apply_model(functools.partial(set_kv_scales, q=q, k=k, v=v))
        print(f"kv scales q={q} k={k} v={v}: {changed} attention layers per worker", flush=True)
    sp = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append({"tokens": list(c.token_ids),
                       "logprobs": [float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)]})
    if _calibrated(a):
        from vllm_asynctls.calibration import index_channels_in_use

        return {"outputs": result, "index_channels": llm.apply_model(index_channels_in_use)}
    return {"outputs": result}


def _fit(llm, context: int, longest: int = G_LONG) -> tuple[int, int]:
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = cache.num_gpu_blocks
    bs = cache.block_size
    per_request = -(-(context + longest + 1) // bs)  # blocks
    return blocks * bs, blocks // per_request


def paper_knobs(budget: int, lagged: bool = False) -> dict:
    """The asynctls knobs of the throughput runs: the paper's settings (block 64, 128 blocks) at
    `budget`, every decode token sparse."""
    return {"token_budget": budget, "num_blocks": 128, "selection_block_size": 64, "sink_tokens": 64,
            "local_tokens": 64, "dense_threshold": 0, "lagged_selection": lagged}


def throughput_engine_kwargs(backend: str, max_model_len: int, kv_bytes: int | None = None,
                             kv_cache_dtype: str | None = None, max_seqs: int = MAX_SEQS) -> dict:
    """`LLM(...)` settings of the throughput runs: dummy weights, prefix caching,
    at most `max_seqs` requests, KV sized by `kv_bytes` (else 90% of the GPU), cache block 64 for asynctls,
    `kv_cache_dtype` when given (fp8: both backends). vLLM's JIT monitor logs every Triton compile after
    warm-up, with its constexprs (by default it names each kernel once): a compile while serving is a spike."""
    kw = dict(max_model_len=max_model_len, max_num_seqs=max_seqs, enable_prefix_caching=True,
              skip_tokenizer_init=True, load_format="dummy", jit_monitor_verbose=True)
    if kv_cache_dtype:
        kw["kv_cache_dtype"] = kv_cache_dtype
    if kv_bytes:
        kw["kv_cache_memory_bytes"] = int(kv_bytes)
    else:
        kw["gpu_memory_utilization"] = 0.9
    if backend == "asynctls":
        kw["block_size"] = 64
    return kw


def stepped_step_times(engine, prompts, max_tokens: int, tag: str) -> list[float]:
    """Wall time of every `engine.step()` (a vLLM `LLMEngine`) while `prompts`, all added at once, decode
    `max_tokens` new tokens each. Their median is the decode step time, which one slow step (a host hiccup, a
    Triton compile, the first step's recompute of the prompts' last blocks) does not move the way it moves a
    whole run's time. A step's wall time is the wait for the engine's next outputs: vLLM's engine core can run
    ahead of this loop (its own process), so after a long step queued outputs return within a millisecond
    (2026-11-27, H200: steps of 0.4-1.5 ms right after a 0.2 s one, and a last step of 85-95 ms): the median
    of a short run is not a decode step's time; that of a run of 100 or more steps is. Raises if a request
    finished with fewer tokens."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, sp)
    times, finished = [], {}
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t)
        finished.update((o.request_id, len(o.outputs[0].token_ids)) for o in outs if o.finished)
    if len(finished) != len(prompts) or any(n != max_tokens for n in finished.values()):
        raise RuntimeError(f"stepped run: expected {len(prompts)} requests of {max_tokens} tokens; got {finished}")
    return times


def timed_run(engine, prompts, max_tokens: int, tag: str) -> tuple[float, list[float]]:
    """One timed run: the wall time from adding `prompts` to `engine` to their last token (what
    `LLM.generate` does: add every request, then step until none is left), and the wall time of each of its
    steps (`stepped_step_times`)."""
    t = time.perf_counter()
    steps = stepped_step_times(engine, prompts, max_tokens, tag)
    return time.perf_counter() - t, steps


def worker_throughput(a) -> dict:
    import random

    from vllm.inputs import TokensPrompt

    contexts = [int(c) for c in a.contexts.split(",")]
    lengths = sorted({int(g) for g in a.decode_lengths.split(",")})
    if len(lengths) < 2 or lengths[0] < 1:
        raise ValueError(f"--decode-lengths needs two or more positive token counts; got {a.decode_lengths!r}")
    kw = throughput_engine_kwargs(a.backend, max(contexts) + max(lengths[-1], G_LONG) + 64, a.kv_bytes,
                                  a.kv_cache_dtype, a.max_seqs)
    t0 = time.perf_counter()
    llm = _llm(a.model, a.backend, json.loads(a.knobs) if a.knobs else None, **kw)
    if a.weights == "random":
        from vllm_asynctls.evaluation.random_weights import randomize_weights

        changed = llm.apply_model(randomize_weights)
        print(f"random weights: {changed} parameter tensors re-initialised per worker", flush=True)
    start_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    kv_tokens = cache.num_gpu_blocks * cache.block_size
    rows = []
    rng = random.Random(0)
    top = min(150000, json.loads((Path(a.model) / "config.json").read_text())["vocab_size"])
    for context in contexts:
        _, fit = _fit(llm, context, lengths[-1])
        n = min(fit, a.max_seqs)
        if n == 0:
            rows.append({"context": context, "requests_fit": 0})
            continue
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, top) for _ in range(context)])
                   for _ in range(n)]

        t_prefill, _ = timed_run(llm.llm_engine, prompts, 1, f"prefill-{context}")
        # Every length `repeats` times, interleaved; the rate comes from the median times, and each
        # repeat's own rate shows the spread. Each run's steps are timed too (`t_runs_steps_ms`).
        times = {g: [] for g in lengths}
        run_steps = {g: [] for g in lengths}
        for rep in range(a.repeats):
            for g in lengths:
                wall, steps_s = timed_run(llm.llm_engine, prompts, g, f"run-{context}-{g}-{rep}")
                times[g].append(wall)
                run_steps[g].append([round(1000 * t, 3) for t in steps_s])
        t_by_length = {g: statistics.median(ts) for g, ts in times.items()}
        t_short, t_long = t_by_length[lengths[0]], t_by_length[lengths[-1]]
        steps = lengths[-1] - lengths[0]
        per_repeat = [1000 * (tl - ts) / steps for ts, tl in zip(times[lengths[0]], times[lengths[-1]])]
        # The same decode stepped one engine step at a time, every step timed: the median step.
        step_s = stepped_step_times(llm.llm_engine, prompts, lengths[-1], f"stepped-{context}")
        median_step = statistics.median(step_s)
        rows.append({"context": context, "requests_fit": fit, "requests": n, "prefill_s": t_prefill,
                     "t_short_s": t_short, "t_long_s": t_long, "t_by_length_s": t_by_length,
                     "repeats": a.repeats, "t_runs_s": times, "t_runs_steps_ms": run_steps,
                     "ms_per_step_runs": per_repeat,
                     "ms_per_step": 1000 * (t_long - t_short) / steps,
                     "decode_tok_s": n * steps / (t_long - t_short),
                     "step_ms_median": 1000 * median_step, "step_ms_quartiles": [
                         1000 * q for q in statistics.quantiles(step_s, n=4)],
                     "stepped_steps": len(step_s), "stepped_total_s": sum(step_s), "step_ms_max": 1000 * max(step_s),
                     "step_ms_first": 1000 * step_s[0],
                     "decode_tok_s_stepped": n / median_step})
        print(json.dumps(rows[-1]), flush=True)
    kv_bytes = getattr(cache, "kv_cache_memory_bytes", None)
    result = {"kv_tokens": kv_tokens, "block_size": cache.block_size, "start_s": start_s, "rows": rows,
              "kv_cache_memory_bytes": kv_bytes, "weights": a.weights, "max_seqs": a.max_seqs}
    if _lagged(a):
        from vllm_asynctls.lagged_state import lagged_state_summary

        # Per layer: decode rows that used the previous step's choice (graph replays included).
        result["lagged_state"] = llm.apply_model(lagged_state_summary)
        print(f"lagged state: {result['lagged_state'][0][:2]} ...", flush=True)
    return result


def _lagged(a) -> bool:
    return bool(a.knobs and json.loads(a.knobs).get("lagged_selection"))


def _calibrated(a) -> bool:
    return bool(a.knobs and json.loads(a.knobs).get("index_calibration_file"))


def run_worker(a) -> None:
    if a.counters:
        os.environ["VLLM_ASYNCTLS_COUNTERS_FILE"] = a.counters
    if a.weights == "random" or _lagged(a) or _calibrated(a) or a.kv_scales:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model sends a function
    result = worker_check(a) if a.role == "check" else worker_throughput(a)
    Path(a.result).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def spawn(out: Path, name: str, timeout: int, **args) -> dict | None:
    result = out / f"{name}.json"
    result.unlink(missing_ok=True)  # an earlier call's result must not pass for this run's
    cmd = [sys.executable, __file__, "--worker", "--result", str(result)]
    for k, v in args.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    t = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"   rc={rc} in {time.perf_counter() - t:.0f}s", flush=True)
    if not result.exists():
        print((out / f"{name}.log").read_text()[-4000:], flush=True)
        return None
    return json.loads(result.read_text())


def check_reference(name: str) -> str:
    """The dense run a check run is compared with: vLLM's backend on the same KV-cache dtype and scales
    (FLASH_ATTN, TRITON_MLA for `mla_*`, FLASH_ATTN on the head-dim-64 model for `hd64_*`); the fp8
    references against the unquantised one."""
    base = ("mla_triton" if name.startswith("mla_") else "hd64_flash_attn" if name.startswith("hd64_")
            else "flash_attn")
    for suffix in ("_fp8_scaled", "_fp8"):
        if name.endswith(suffix):
            return base if name == base + suffix else base + suffix
    return base


def _compare(ref: dict, other: dict) -> dict:
    """Per prompt: greedy tokens agreeing from the start, and the largest |logprob difference| of the
    chosen token over those steps."""
    agree, diff = [], 0.0
    for r, o in zip(ref["outputs"], other["outputs"]):
        n = 0
        while n < len(r["tokens"]) and r["tokens"][n] == o["tokens"][n]:
            n += 1
        steps = min(n + 1, len(r["tokens"]))  # the first differing step still has a common prefix
        diff = max([diff] + [abs(a - b) for a, b in zip(r["logprobs"][:steps], o["logprobs"][:steps])])
        agree.append(n)
    return {"agreeing_tokens": agree, "max_abs_logprob_diff": diff}


def stage_check(out: Path, budget_s: float, only: list[str] | None = None) -> dict:
    import random

    model = small_model_dir(out / "models")
    rng = random.Random(0)
    prompts = [[rng.randrange(8, 500) for _ in range(3000)] for _ in range(4)] + [
        [rng.randrange(8, 500) for _ in range(100)]]
    (out / "prompts.json").write_text(json.dumps(prompts))
    cover = {"token_budget": 4096, "num_blocks": 256, "selection_block_size": 16, "sink_tokens": 64,
             "local_tokens": 64, "dense_threshold": 0}
    small = {"token_budget": 256, "num_blocks": 64, "selection_block_size": 16, "sink_tokens": 16,
             "local_tokens": 16, "dense_threshold": 0}
    default_runs = ["asynctls_cover", "flash_attn", "triton_attn", "asynctls_cover_eager", "asynctls_256"]
    runs = {
        "asynctls_cover": dict(backend="asynctls", knobs=json.dumps(cover)),
        "flash_attn": dict(backend="FLASH_ATTN"),
        "triton_attn": dict(backend="TRITON_ATTN"),
        "asynctls_cover_eager": dict(backend="asynctls", knobs=json.dumps(cover), eager=True),
        # Tensor parallelism (needs 2 GPUs): each rank selects over its own kv heads.
        "asynctls_cover_tp2": dict(backend="asynctls", knobs=json.dumps(cover), tp=2),
        "flash_attn_tp2": dict(backend="FLASH_ATTN", tp=2),
        # Same torch.compile'd model without CUDA graphs: isolates what graph capture changes.
        "asynctls_cover_nograph": dict(backend="asynctls", knobs=json.dumps(cover), cudagraph_mode="NONE"),
        "asynctls_256": dict(backend="asynctls", knobs=json.dumps(small), counters=str(out / "counters_256")),
        # Lagged selection (the state carried between steps in vllm_asynctls.lagged_state), covering budget.
        "asynctls_cover_lagged": dict(backend="asynctls", knobs=json.dumps(dict(cover, lagged_selection=True))),
        # The same with the index in each kv head's principal directions (the query rotated once per layer
        # and step), covering and at 256 tokens (must have run sparse: its counters).
        "asynctls_cover_lagged_pca": dict(backend="asynctls", knobs=json.dumps(
            dict(cover, lagged_selection=True, index_basis="pca"))),
        "asynctls_256_lagged_pca": dict(backend="asynctls", knobs=json.dumps(
            dict(small, lagged_selection=True, index_basis="pca")), counters=str(out / "counters_256_lagged_pca")),
        # MLA (`small_mla_model_dir`): TRITON_MLA (the parent of asynctls' GPU MLA backend; the reference of
        # these runs), vLLM's default MLA backend (the dense spread), asynctls covering (graphs, eager,
        # lagged) and at 256 tokens (must have run sparse: its counters).
        "mla_triton": dict(backend="TRITON_MLA", mla=True),
        "mla_default": dict(backend="default", mla=True),
        "mla_asynctls_cover": dict(backend="asynctls", knobs=json.dumps(cover), mla=True),
        "mla_asynctls_cover_eager": dict(backend="asynctls", knobs=json.dumps(cover), eager=True, mla=True),
        "mla_asynctls_cover_lagged": dict(backend="asynctls", knobs=json.dumps(dict(cover, lagged_selection=True)),
                                          mla=True),
        # `--kv-cache-dtype bfloat16` on this bf16 model: the model's own dtype by name, the same cache as
        # 'auto' (must equal the covering runs above).
        "asynctls_cover_kv_bf16": dict(backend="asynctls", knobs=json.dumps(cover), kv_cache_dtype="bfloat16"),
        "mla_asynctls_cover_kv_bf16": dict(backend="asynctls", knobs=json.dumps(cover), kv_cache_dtype="bfloat16",
                                           mla=True),
        # `--kv-cache-dtype fp8` (e4m3 with per-tensor scales): FLASH_ATTN on it is these runs' reference
        # (FLASH_ATTN on fp8 vs bf16 is the quantisation's own spread); asynctls covering and at 256 tokens.
        "flash_attn_fp8": dict(backend="FLASH_ATTN", kv_cache_dtype="fp8"),
        "asynctls_cover_fp8": dict(backend="asynctls", knobs=json.dumps(cover), kv_cache_dtype="fp8"),
        "asynctls_cover_lagged_fp8": dict(backend="asynctls", knobs=json.dumps(dict(cover, lagged_selection=True)),
                                          kv_cache_dtype="fp8"),
        "asynctls_256_fp8": dict(backend="asynctls", knobs=json.dumps(small), kv_cache_dtype="fp8",
                                 counters=str(out / "counters_256_fp8")),
        # The same with non-unit q / k / v scales (`vllm_asynctls.evaluation.kv_scales`), set before the first
        # prompt: a scale the decode path ignored or applied twice would show against FLASH_ATTN here.
        "flash_attn_fp8_scaled": dict(backend="FLASH_ATTN", kv_cache_dtype="fp8", kv_scales="0.125,0.0625,0.03"),
        "asynctls_cover_fp8_scaled": dict(backend="asynctls", knobs=json.dumps(cover), kv_cache_dtype="fp8",
                                          kv_scales="0.125,0.0625,0.03"),
        "mla_asynctls_256": dict(backend="asynctls", knobs=json.dumps(small), counters=str(out / "counters_mla_256"),
                                 mla=True),
        # TRITON_MLA itself with the model dtype named: its own 'auto' vs 'bfloat16' spread.
        "mla_triton_kv_bf16": dict(backend="TRITON_MLA", kv_cache_dtype="bfloat16", mla=True),
        # MLA on an fp8 cache (TRITON_MLA's e4m3 rows, `_k_scale` for key and value): TRITON_MLA on it is
        # the reference; asynctls covering, at 256 tokens, and with non-unit scales.
        "mla_triton_fp8": dict(backend="TRITON_MLA", kv_cache_dtype="fp8", mla=True),
        "mla_asynctls_cover_fp8": dict(backend="asynctls", knobs=json.dumps(cover), kv_cache_dtype="fp8", mla=True),
        "mla_asynctls_256_fp8": dict(backend="asynctls", knobs=json.dumps(small), kv_cache_dtype="fp8", mla=True,
                                     counters=str(out / "counters_mla_256_fp8")),
        "mla_triton_fp8_scaled": dict(backend="TRITON_MLA", kv_cache_dtype="fp8", kv_scales="0.125,0.0625,0.03",
                                      mla=True),
        "mla_asynctls_cover_fp8_scaled": dict(backend="asynctls", knobs=json.dumps(cover), kv_cache_dtype="fp8",
                                              kv_scales="0.125,0.0625,0.03", mla=True),
        # The head-dim-64 model (`small_hd64_model_dir`): FLASH_ATTN on it is the reference; asynctls covering
        # (graphs, lagged) and at 256 tokens (must have run sparse: its counters); TRITON_ATTN the dense spread.
        "hd64_flash_attn": dict(backend="FLASH_ATTN", hd64=True),
        "hd64_triton_attn": dict(backend="TRITON_ATTN", hd64=True),  # the dense spread on this model
        "hd64_asynctls_cover": dict(backend="asynctls", knobs=json.dumps(cover), hd64=True),
        "hd64_asynctls_cover_lagged": dict(backend="asynctls", knobs=json.dumps(dict(cover, lagged_selection=True)),
                                           hd64=True),
        "hd64_asynctls_256": dict(backend="asynctls", knobs=json.dumps(small), counters=str(out / "counters_hd64_256"),
                                  hd64=True),
        # Index channels from a calibration file (`python -m vllm_asynctls.calibration`, made here on the GPU).
        "asynctls_256_calibrated": dict(backend="asynctls", knobs=json.dumps(
            dict(small, index_calibration_file=str(out / "channels.json"))), counters=str(out / "counters_256_cal")),
    }
    runs = {k: v for k, v in runs.items() if k in (only or default_runs)}
    if "asynctls_256_calibrated" in runs:
        cmd = [sys.executable, "-m", "vllm_asynctls.calibration", str(model), "--out", str(out / "channels.json"),
               "--dtype", "bfloat16", "--lengths", "2048"]
        print(f"== calibration: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, timeout=600)
    mla_model = small_mla_model_dir(out / "models") if any(kw.get("mla") for kw in runs.values()) else None
    hd64_model = small_hd64_model_dir(out / "models") if any(kw.get("hd64") for kw in runs.values()) else None
    res, t0 = {}, time.perf_counter()
    for name, kw in runs.items():
        kw = dict(kw)
        run_model = mla_model if kw.pop("mla", False) else hd64_model if kw.pop("hd64", False) else model
        left = budget_s - (time.perf_counter() - t0)
        if left < 60:
            print(f"== {name}: skipped, {left:.0f}s of the time budget left", flush=True)
            res[name] = None
            continue
        res[name] = spawn(out, f"check_{name}", int(left), role="check", model=run_model,
                          prompts=out / "prompts.json", **kw)
    summary = {f"{name}_ran": r is not None for name, r in res.items()}
    # Runs of an earlier call into the same OUT count as references (not rerun), so a session can split
    # its runs over several calls.
    for path in sorted(out.glob("check_*.json")):
        name = path.stem[len("check_"):]
        if name not in res and not name.startswith("summary"):
            res[name] = json.loads(path.read_text())
    for name, r in res.items():
        ref_name = check_reference(name)
        if name != ref_name and r is not None and res.get(ref_name) is not None:
            summary[f"{name}_vs_{ref_name}"] = _compare(res[ref_name], r)
    if res.get("asynctls_cover") and res.get("asynctls_cover_eager"):
        summary["asynctls_graph_vs_eager"] = _compare(res["asynctls_cover_eager"], res["asynctls_cover"])
    if res.get("asynctls_cover") and res.get("asynctls_cover_tp2"):
        summary["asynctls_tp2_vs_tp1"] = _compare(res["asynctls_cover"], res["asynctls_cover_tp2"])
    if res.get("flash_attn") and res.get("flash_attn_tp2"):
        summary["flash_attn_tp2_vs_tp1"] = _compare(res["flash_attn"], res["flash_attn_tp2"])
    for name in ("asynctls_cover", "mla_asynctls_cover"):  # (mla_triton_kv_bf16 vs mla_triton: above)
        if res.get(name) and res.get(f"{name}_kv_bf16"):
            summary[f"{name}_kv_bf16_vs_auto"] = _compare(res[name], res[f"{name}_kv_bf16"])
    if res.get("mla_triton_kv_bf16") and res.get("mla_asynctls_cover_kv_bf16"):
        summary["mla_asynctls_cover_kv_bf16_vs_mla_triton_kv_bf16"] = _compare(
            res["mla_triton_kv_bf16"], res["mla_asynctls_cover_kv_bf16"])
    if res.get("asynctls_cover") and res.get("asynctls_cover_nograph"):
        summary["asynctls_graph_vs_nograph"] = _compare(res["asynctls_cover_nograph"], res["asynctls_cover"])
    if res.get("asynctls_256_calibrated"):
        from vllm_asynctls.calibration import load_calibration

        file_layers = [list(map(list, layer)) for layer in load_calibration(out / "channels.json").layers]
        summary["asynctls_256_calibrated_serves_the_files_channels"] = (
            res["asynctls_256_calibrated"]["index_channels"] == [file_layers])
    for prefix in ("counters_256", "counters_256_lagged_pca", "counters_mla_256", "counters_256_fp8",
                   "counters_mla_256_fp8", "counters_hd64_256"):
        counters = sorted(out.glob(f"{prefix}.*"))
        counters = [p for p in counters if not p.name.endswith(".tmp")]
        summary[f"asynctls_{prefix[len('counters_'):]}_counters"] = [json.loads(p.read_text()) for p in counters]
    (out / f"check_summary{'_' + '_'.join(only) if only else ''}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def attention_backends_logged(log: Path) -> list[str]:
    """The attention backends vLLM says it chose in an engine's log ("Using X attention backend out of
    potential backends: ...", one per engine process), in order, without repeats."""
    found = re.findall(r"Using (\S+) attention backend out of potential backends", log.read_text(errors="replace"))
    return list(dict.fromkeys(found))


def stage_throughput(out: Path, which: str, contexts: str, budgets: list[int], weights: str = "dummy",
                     decode_lengths: str = f"{G_SHORT},{G_LONG}", lagged: bool = False, repeats: int = 5,
                     model_shapes: str = "qwen3-8b", kv_cache_dtype: str | None = None,
                     max_seqs: int = MAX_SEQS) -> None:
    model = THROUGHPUT_MODELS[model_shapes](out / "models", 131072)
    extra_s = 60 * (repeats - 1) * len(contexts.split(","))  # the timed runs beyond the first, per context
    if which == "dense":
        result = spawn(out, "tput_dense", 590 + extra_s, role="throughput", model=model, backend="default",
                       contexts=contexts, weights=weights, decode_lengths=decode_lengths, repeats=repeats,
                       kv_cache_dtype=kv_cache_dtype, max_seqs=max_seqs)
        if result is not None:  # which backend "default" was on this machine, kept beside the timings
            result["attention_backends"] = attention_backends_logged(out / "tput_dense.log")
            (out / "tput_dense.json").write_text(json.dumps(result))
        return
    dense = json.loads((out / "tput_dense.json").read_text()) if (out / "tput_dense.json").exists() else None
    dense_cap = dense.get("max_seqs", MAX_SEQS) if dense is not None else max_seqs  # runs before the flag: 16
    if dense_cap != max_seqs:
        raise ValueError(f"--max-seqs {max_seqs} differs from the dense run's {dense_cap} "
                         f"({out / 'tput_dense.json'}): give both stages the same request cap")
    kv_bytes = None
    if dense is not None:
        config = json.loads((model / "config.json").read_text())
        from vllm.utils.torch_utils import get_kv_cache_torch_dtype

        dtype_bytes = get_kv_cache_torch_dtype(kv_cache_dtype or "auto", "bfloat16").itemsize  # the runs' dtype
        kv_bytes = dense["kv_tokens"] * kv_bytes_per_token(config, dtype_bytes)  # the dense run's K/V bytes
    for budget in budgets:
        knobs = paper_knobs(budget, lagged)
        spawn(out, f"tput_asynctls_{budget}{'_lagged' if lagged else ''}", 590 // len(budgets) + extra_s,
              role="throughput", model=model, backend="asynctls", knobs=json.dumps(knobs), contexts=contexts,
              kv_bytes=kv_bytes, weights=weights, decode_lengths=decode_lengths, repeats=repeats,
              kv_cache_dtype=kv_cache_dtype, max_seqs=max_seqs)


def stage_report(out: Path) -> None:
    """The throughput table: per context and backend, the decode rate, the step time and, per repeat, the
    step time each repeat gave on its own (when they spread more than the backends differ, the ratio is
    noise: run more repeats or longer decode runs)."""
    dense = json.loads((out / "tput_dense.json").read_text())
    base = {r["context"]: r for r in dense["rows"]}
    print("| context | backend | requests (fit) | decode tok/s | ms/step | ms/step per repeat | vs dense | "
          "median step ms (quartiles) | vs dense, median step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    paths = [out / "tput_dense.json", *sorted(out.glob("tput_asynctls_*.json"))]
    engines = {path.stem.replace("tput_", ""): json.loads(path.read_text())["rows"] for path in paths}
    for name, rows in engines.items():
        for r in rows:
            if not r.get("requests"):
                continue
            ratio, by_step = ratios_to_dense(r, base.get(r["context"]))
            runs = " / ".join(f"{ms:.1f}" for ms in r.get("ms_per_step_runs", [])) or "-"
            stepped = "-"
            if "step_ms_median" in r:
                q1, _, q3 = r["step_ms_quartiles"]
                stepped = f"{r['step_ms_median']:.2f} ({q1:.2f}-{q3:.2f})"
            stepped_ratio = f"{by_step:.2f}x" if by_step is not None else "-"
            print(f"| {r['context'] // 1024}K | {name} | {r['requests']} ({r['requests_fit']}) | "
                  f"{r['decode_tok_s']:.0f} | {r['ms_per_step']:.1f} | {runs} | {ratio:.2f}x | {stepped} | "
                  f"{stepped_ratio} |")
    disagreements = [line for name, rows in engines.items() for line in rate_disagreements(name, rows, base)]
    if disagreements:
        print(f"\nThe two measures disagree by more than {RATE_DISAGREEMENT:.0%} (quote both, or rerun):")
        print("\n".join(disagreements))
    backends = dense.get("attention_backends")
    print(f"\nThe dense engine's attention backend (vLLM's log): {', '.join(backends) if backends else 'not recorded'}")
    print("\nKernel compiles while serving (vLLM's JIT monitor, in each engine's log; each one stalls a step):")
    for path in paths:
        log, engine = path.with_suffix(".log"), path.stem.replace("tput_", "")
        if not log.exists():
            print(f"- {engine}: no log")
            continue
        counts = Counter(jit_compiles_while_serving(log.read_text(errors="replace")))  # first-seen order
        print(f"- {engine}: {', '.join(f'{n} x{c}' for n, c in counts.items()) or 'none'}")


def rate_disagreements(engine: str, rows: list[dict], dense_rows: dict[int, dict]) -> list[str]:
    """Where the two measures of the result rows `rows` of `engine` part: one line per row whose median
    stepped step and timed-run step time differ by more than RATE_DISAGREEMENT of the smaller, and, for a
    sparse engine, one per row whose ratio to the dense row of its context (`dense_rows`) differs by more
    than that between the two measures (two engines each just inside the tolerance in opposite directions
    move the ratio twice as far). When they part, a ratio taken from either measure alone is not a fact
    about the backends."""
    def apart(a: float, b: float) -> bool:
        return abs(a - b) > RATE_DISAGREEMENT * min(a, b)

    lines = []
    for r in rows:
        if not r.get("requests") or "step_ms_median" not in r:
            continue
        ctx = f"{r['context'] // 1024}K {engine}"
        median, runs = r["step_ms_median"], r["ms_per_step"]
        if apart(median, runs):
            lines.append(f"- {ctx}: median step {median:.2f} ms, timed runs {runs:.2f} ms per step"
                         + (run_steps_note(r) if r.get("t_runs_steps_ms") else run_excess_note(r)))
        timed, stepped = ratios_to_dense(r, dense_rows.get(r["context"]))
        if engine != "dense" and stepped is not None and apart(timed, stepped):
            lines.append(f"- {ctx}: {stepped:.2f}x dense by the median step, {timed:.2f}x by the timed runs")
    return lines


def ratios_to_dense(row: dict, dense: dict | None) -> tuple[float, float | None]:
    """A result row's decode rate over the dense row of its context, by the timed runs (nan without a dense
    row that fitted) and by the median step (None unless both rows were stepped)."""
    if not dense or not dense.get("requests"):
        return float("nan"), None
    by_step = (row["decode_tok_s_stepped"] / dense["decode_tok_s_stepped"]
               if "step_ms_median" in row and "step_ms_median" in dense else None)
    return row["decode_tok_s"] / dense["decode_tok_s"], by_step


def run_excess_note(row: dict) -> str:
    """A flagged step time's gap split by timed run: each run's wall time beyond the stepped run's model of
    it (its first step, then one median step per token: a stepped n-token decode takes n + 1 steps), per
    decode length. The timed rate is the median step plus (median excess of the longest runs - that of the
    shortest) / their length difference, so the gap is the difference of those excesses. For result files
    whose timed runs' steps were not recorded (before `t_runs_steps_ms`): which steps hold an excess is not
    known."""
    if "step_ms_first" not in row or not row.get("t_runs_s"):
        return ""
    first, median = row["step_ms_first"] / 1000, row["step_ms_median"] / 1000
    parts = [f"{n} tokens " + " / ".join(f"{t - first - int(n) * median:+.2f}" for t in ts)
             for n, ts in sorted(row["t_runs_s"].items(), key=lambda kv: int(kv[0]))]
    return f" (each timed run's seconds beyond the stepped model: {'; '.join(parts)})"


def run_steps_note(row: dict) -> str:
    """A flagged step time's gap located in the timed runs' own steps (`t_runs_steps_ms`): per run, its
    steps, its first step, its median step, and its wall time outside the steps (adding the requests)."""
    parts = []
    for n, runs in sorted(row["t_runs_steps_ms"].items(), key=lambda kv: int(kv[0])):
        for wall, steps in zip(row["t_runs_s"][n], runs):
            parts.append(f"{n} tokens: {len(steps)} steps, first {steps[0]:.0f} ms, median "
                         f"{statistics.median(steps):.2f} ms, outside the steps {wall - sum(steps) / 1000:.2f} s")
    return f" (each timed run: {'; '.join(parts)})"


def jit_compiles_while_serving(log_text: str) -> list[str]:
    """Kernel names of the compiles vLLM's JIT monitor logged after warm-up, in order (the throughput engines
    log every compile: `jit_monitor_verbose`)."""
    return re.findall(r"compilation during inference: (\w+)", log_text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["check", "dense", "asynctls", "report"])
    p.add_argument("--out", default="benchmarks/out/e2e")
    p.add_argument("--contexts", default="32768,65536,98304")
    p.add_argument("--budgets", default="2048,1024")
    p.add_argument("--time-budget", type=float, default=560.0, help="seconds the check stage may take")
    p.add_argument("--runs", help="check stage: comma-separated subset of its engine runs")
    p.add_argument("--cudagraph-mode", help="check worker: vLLM compilation_config cudagraph_mode")
    p.add_argument("--tp", type=int, default=1, help="check worker: tensor_parallel_size")
    p.add_argument("--kv-cache-dtype", help="throughput stages (both backends; one --out per dtype) and check "
                                             "worker: vLLM kv_cache_dtype, e.g. fp8")
    p.add_argument("--decode-lengths", default=f"{G_SHORT},{G_LONG}",
                   help="throughput stages: new tokens per timed run (decode rate from the shortest and longest; "
                        "more lengths show whether a cost is per step or once per run)")
    p.add_argument("--repeats", type=int, default=5,
                   help="throughput stages: timed runs of each decode length (medians; the spread is recorded)")
    p.add_argument("--max-seqs", type=int, default=MAX_SEQS,
                   help="throughput stages (and their workers): at most this many requests per context, fewer "
                        "where fewer fit; the asynctls stage refuses a cap other than the dense run's")
    p.add_argument("--lagged", action="store_true",
                   help="asynctls stage: lagged selection (the paper's pipelining; results tput_asynctls_B_lagged)")
    p.add_argument("--model-shapes", choices=sorted(THROUGHPUT_MODELS), default="qwen3-8b",
                   help="throughput stages: the model whose shapes are served (dummy weights); use one --out per model")
    p.add_argument("--weights", choices=["dummy", "random"], default="dummy",
                   help="throughput stages: vLLM's dummy weights (on Qwen3-8B shapes a degenerate selection), or "
                        "re-initialised N(0, 0.02)")
    # worker arguments
    p.add_argument("--worker", action="store_true")
    p.add_argument("--role", choices=["check", "throughput"])
    p.add_argument("--result")
    p.add_argument("--model")
    p.add_argument("--backend")
    p.add_argument("--knobs")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--prompts")
    p.add_argument("--counters")
    p.add_argument("--kv-bytes")
    p.add_argument("--kv-scales", help="check worker: fp8 q,k,v scales set on every attention layer after loading")
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats must be >= 1; got {a.repeats}")
    if a.max_seqs < 1:
        p.error(f"--max-seqs must be >= 1; got {a.max_seqs}")
    if a.worker:
        run_worker(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.stage == "check":
        stage_check(out, a.time_budget, a.runs.split(",") if a.runs else None)
    elif a.stage in ("dense", "asynctls"):
        stage_throughput(out, a.stage, a.contexts, [int(b) for b in a.budgets.split(",")], a.weights,
                         a.decode_lengths, a.lagged, a.repeats, a.model_shapes, a.kv_cache_dtype, a.max_seqs)
    elif a.stage == "report":
        stage_report(out)
    else:
        p.error("--stage is required")


if __name__ == "__main__":
    main()
