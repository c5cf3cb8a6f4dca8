"""Per-step timeline of long-context decode in real vLLM: wall time of every engine step, the Triton
kernels compiled during it, and the GPU kernels of chosen steps (torch.profiler, CUPTI).

`bench_vllm_e2e.py` gives one decode rate per context, from the time of a long run minus a short
one. When that rate moves, this script says where the time went: a step that costs a prefill
(preemption, a recompute), a step with a Triton compile, steps that get slower after some token
(a selection block filled by decode), or a kernel that takes longer inside the replayed graph.

    python benchmarks/trace_vllm_decode_steps.py --backend asynctls --context 65536 --out OUT
    python benchmarks/trace_vllm_decode_steps.py --backend default --context 65536 --out OUT
    python benchmarks/trace_vllm_decode_steps.py --model glm-4.7-flash-shapes --kv-cache-dtype fp8 \
        --context 32768 --repeats 3 --out OUT   # the GLM-shaped throughput runs' repeats, step by step

Same engine as `bench_vllm_e2e.py --stage asynctls|dense` (Qwen3-8B shapes by default, or `--model`'s,
dummy or `--weights random`, prefix caching, block 64 for asynctls, budget 2048): a prefill-only pass fills
the prefix cache, then a run of `--short` and one of `--long` new tokens (`--repeats` times, alternating) are
stepped with `LLMEngine.step()` in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and every step timed.
`--profile-steps 4,100` profiles those decode steps of the long run (a few steps each) with
torch.profiler and writes the per-kernel GPU times. OUT gets `trace_<label>.json` and
`trace_<label>.png` (step time against step index, one line per run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --model: bench_vllm_e2e.THROUGHPUT_MODELS' key for each choice.
MODEL_SHAPES = {"qwen3-8b-shapes": "qwen3-8b", "deepseek-v2-lite-shapes": "deepseek-v2-lite",
                "glm-4.7-flash-shapes": "glm-4.7-flash"}


def _new_compiles(cache_dir: Path, seen: set[str]) -> list[str]:
    """Kernel names of Triton cache entries that appeared since the last call (a compile, in this
    process or a worker)."""
    names = []
    if not cache_dir.is_dir():
        return names
    for entry in os.scandir(cache_dir):
        if entry.name in seen:
            continue
        seen.add(entry.name)
        metas = [p for p in Path(entry.path).glob("*.json") if not p.name.startswith("__grp__")]
        names.extend(p.stem for p in metas) if metas else names.append(entry.name)
    return names


def _kernel_table(prof, steps: int, device_type: str) -> list[dict]:
    """Kernels (CUDA) or ops (CPU) of a profiled window: name, calls and microseconds per step,
    largest first."""
    rows = {}
    for evt in prof.events():
        if evt.device_type.name != device_type:
            continue
        r = rows.setdefault(evt.name, {"kernel": evt.name[:120], "calls": 0, "us": 0.0})
        r["calls"] += 1
        r["us"] += evt.device_time if device_type == "CUDA" else evt.cpu_time
    out = sorted(rows.values(), key=lambda r: -r["us"])
    for r in out:
        r["us_per_step"] = r["us"] / steps
        r["calls_per_step"] = r["calls"] / steps
    return out


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def trace(a) -> dict:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_vllm_e2e import (MAX_SEQS, THROUGHPUT_MODELS, _fit, _llm, paper_knobs, small_model_dir,
                                throughput_engine_kwargs)

    out = Path(a.out)
    cache_dir = Path(os.environ["TRITON_CACHE_DIR"])
    seen: set[str] = set()
    kw = throughput_engine_kwargs(a.backend, a.context + a.long + 64, a.kv_bytes, a.kv_cache_dtype)
    if a.model == "small":  # a 4-layer model with random weights: the CPU smoke test
        model = small_model_dir(out / "models")
        for cuda_only in ("load_format", "gpu_memory_utilization", "kv_cache_memory_bytes"):
            kw.pop(cuda_only, None)
    else:
        model = THROUGHPUT_MODELS[MODEL_SHAPES[a.model]](out / "models", 131072)
    knobs = paper_knobs(a.budget, a.lagged) if a.backend == "asynctls" else None
    t0 = time.perf_counter()
    llm = _llm(str(model), a.backend, knobs, **kw)
    if a.weights == "random":
        from vllm_asynctls.evaluation.random_weights import randomize_weights

        llm.apply_model(randomize_weights)
    start = {"start_s": time.perf_counter() - t0, "compiles": _new_compiles(cache_dir, seen)}
    cache = llm.llm_engine.vllm_config.cache_config
    _, fit = _fit(llm, a.context, a.long)
    n = min(fit, MAX_SEQS, a.requests or MAX_SEQS)
    if n == 0:
        raise SystemExit(f"no request of {a.context} tokens fits the KV cache ({cache.num_gpu_blocks} blocks)")
    import random

    rng = random.Random(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(min(1000, vocab // 2), min(150000, vocab))
                                              for _ in range(a.context)])
               for _ in range(n)]
    engine = llm.llm_engine
    profile_at = sorted(int(s) for s in a.profile_steps.split(",")) if a.profile_steps else []
    runs = {}
    schedule = [("prefill", 1)] + [(f"{name}{'' if r == 0 else f'_{r + 1}'}", n) for r in range(a.repeats)
                                   for name, n in (("short", a.short), ("long", a.long))]
    for label, max_tokens in schedule:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        for i, p in enumerate(prompts):
            engine.add_request(f"{label}-{i}", p, sp)
        steps, step_no, profiles, prof = [], 0, [], None
        t_run = time.perf_counter()
        while engine.has_unfinished_requests():
            window = label == "long" and any(s <= step_no < s + a.profile_len for s in profile_at)
            if window and prof is None:
                _sync(torch)
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                prof = torch.profiler.profile(activities=activities)
                prof.__enter__()
                prof_start = step_no
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            if prof is not None and not (label == "long" and any(s <= step_no + 1 < s + a.profile_len
                                                                  for s in profile_at)):
                _sync(torch)
                prof.__exit__(None, None, None)
                k = step_no + 1 - prof_start
                profiles.append({"first_step": prof_start, "steps": k, "kernels": _kernel_table(
                    prof, k, "CUDA" if torch.cuda.is_available() else "CPU")[:40]})
                prof = None
            steps.append({"step": step_no, "s": dt, "finished": sum(o.finished for o in outs),
                          "compiles": _new_compiles(cache_dir, seen)})
            step_no += 1
        if prof is not None:  # the run ended inside a profiled window
            _sync(torch)
            prof.__exit__(None, None, None)
            k = step_no - prof_start
            profiles.append({"first_step": prof_start, "steps": k, "kernels": _kernel_table(
                prof, k, "CUDA" if torch.cuda.is_available() else "CPU")[:40]})
        runs[label] = {"max_tokens": max_tokens, "total_s": time.perf_counter() - t_run, "steps": steps,
                       "profiles": profiles}
        print(f"{label}: {len(steps)} steps, {runs[label]['total_s']:.3f} s; slowest steps "
              f"{sorted(((round(s['s'] * 1e3, 2), s['step']) for s in steps), reverse=True)[:5]} (ms, step); "
              f"compiles {[c for s in steps for c in s['compiles']]}", flush=True)
    return {"backend": a.backend, "context": a.context, "requests": n, "requests_fit": fit,
            "kv_tokens": cache.num_gpu_blocks * cache.block_size, "weights": a.weights, "startup": start,
            "runs": runs, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, run in result["runs"].items():
        if label == "prefill":
            continue
        steps = run["steps"]
        ax.plot([s["step"] for s in steps], [1e3 * s["s"] for s in steps], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("engine step of the run (step 0 recomputes the prompt's last block)")
    ax.set_ylabel("wall time (ms)")
    ax.set_title(f"{result['backend']}, {result['context'] // 1024}K x {result['requests']} requests, "
                 f"{result['weights']} weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["asynctls", "default"], default="asynctls")
    p.add_argument("--model", choices=sorted(MODEL_SHAPES) + ["small"], default="qwen3-8b-shapes",
                   help="the shapes of bench_vllm_e2e's throughput models (dummy weights), or small: its 4-layer "
                        "check model (CPU smoke test)")
    p.add_argument("--kv-cache-dtype", help="vLLM kv_cache_dtype, e.g. fp8")
    p.add_argument("--repeats", type=int, default=1,
                   help="the short and long runs this many times, alternating (later ones labelled short_2, long_2, ...)")
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--requests", type=int, default=0, help="at most this many (default: as many as fit, <= 16)")
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=136)
    p.add_argument("--weights", choices=["dummy", "random"], default="dummy")
    p.add_argument("--lagged", action="store_true", help="asynctls: lagged selection (the paper's pipelining)")
    p.add_argument("--kv-bytes", type=int, help="kv_cache_memory_bytes (default: gpu_memory_utilization 0.9)")
    p.add_argument("--profile-steps", default="4,100", help="decode steps of the long run to profile ('' for none)")
    p.add_argument("--profile-len", type=int, default=3)
    p.add_argument("--label", default=None)
    p.add_argument("--out", default="benchmarks/out/trace")
    a = p.parse_args()
    for name, v in (("--context", a.context), ("--short", a.short), ("--budget", a.budget)):
        if v < 1:
            p.error(f"{name} must be a positive integer; got {v}")
    if a.repeats < 1:
        p.error(f"--repeats must be a positive integer; got {a.repeats}")
    if a.long <= a.short:
        p.error(f"--long must be larger than --short ({a.short}); got {a.long}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: steps and profiler
    os.environ.setdefault("TRITON_CACHE_DIR", str(out / "triton_cache"))
    if a.weights == "random":
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    result = trace(a)
    label = a.label or f"{a.backend}_{a.context // 1024}k"
    (out / f"trace_{label}.json").write_text(json.dumps(result, indent=1))
    try:
        plot(result, out / f"trace_{label}.png")
    except ImportError as e:  # matplotlib is optional on a bare GPU machine
        print(f"no plot: {e}", flush=True)
    print(f"wrote {out / f'trace_{label}.json'}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # vLLM's shutdown can hang


if __name__ == "__main__":
    main()
