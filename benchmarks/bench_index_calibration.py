"""Recall on a real model's own keys: online index channels against a calibration file, and the
block score's `block_bound_weight`.

SmolLM2-135M-Instruct (the registry package's checkpoint, 30 layers, 9 q / 3 kv heads, head dim 64)
at 8K, the selection scaled to the share of the context it keeps at 64K with the paper's settings:
blocks holding 12.5% of the context (16 of 128 blocks of 64, or 64 of 512 blocks of 16), a token
budget of 3.1% (256; also 128), a quarter of the channels (16 of 64) at 4 bits.

Rows, each as attention-mass recall (share of the dense softmax mass the attended positions hold,
`vllm_asynctls.evaluation.recall.selection_recall`) and as a share of exact top-k's:
- exact top-k, block-only (Quest), and the cap: exact scores inside the kept blocks (`index_bits=16`);
- AsyncTLS with channels chosen online from the prompt's own keys (the plugin's default, `mean_abs`;
  also `std`);
- AsyncTLS with channels from calibration files made by `vllm_asynctls.calibration` on *other* prompts
  (the suite at another seed): `std` with queries (the command's default), `mean_abs` with queries,
  `std` from keys alone;
- AsyncTLS and block-only with the index in the prompt's principal directions (`index_basis="pca"`,
  calibrated online like the channels);
- AsyncTLS (online channels, and the pca basis) and block-only with `block_bound_weight` w < 1
  (`--block-bound-weights`, default 0.5 and 0.25): the block score leaning from Quest's bound toward the
  block's midpoint.

    python benchmarks/bench_index_calibration.py [--samples 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4, help="evaluation prompts (one per task, 8K)")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--calibration-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4, help="query positions per prompt (the last ones)")
    p.add_argument("--block-bound-weights", type=float, nargs="*", default=[0.5, 0.25])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
    from vllm_asynctls.calibration import capture_calibration
    from vllm_asynctls.evaluation import long_context_suite as suite
    from vllm_asynctls.evaluation.real_model import smollm2_checkpoint
    from vllm_asynctls.evaluation.recall import capture_qk, selection_recall

    torch.manual_seed(0)
    path = str(smollm2_checkpoint())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    calib_ids = [tok(s.prompt, add_special_tokens=False)["input_ids"]
                 for s in suite.build_suite(tok, [args.calibration_length], 1, seed=1)]
    capture = capture_calibration(model, calib_ids)  # one run of the model serves the three files
    files = {
        "file: std + queries": capture.choose(16, "std", True, model_name="smollm2"),
        "file: mean_abs + queries": capture.choose(16, "mean_abs", True),
        "file: std, keys only": capture.choose(16, "std", False),
    }
    print(f"calibration files from {sum(map(len, calib_ids))} tokens in {time.perf_counter() - t0:.0f} s", flush=True)

    settings = {"block 64, 16 blocks": dict(selection_block_size=64, num_blocks=16),
                "block 16, 64 blocks": dict(selection_block_size=16, num_blocks=64)}
    budgets = (256, 128)
    samples = suite.build_suite(tok, [args.length], 1, seed=0)[: args.samples]
    sums: dict[tuple[str, int, str], list[float]] = {}
    for s in tqdm(samples, desc="evaluation prompts"):
        ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
        layers = capture_qk(model, ids, list(range(len(ids) - args.steps, len(ids))))
        for name, kw in settings.items():
            for budget in budgets:
                base = SparseAttentionConfig(token_budget=budget, index_channels=16, **kw)
                online = {"exact top-k": base.with_(mode="exact_topk"), "block-only": base.with_(mode="block_only"),
                          "cap: exact scores in kept blocks": base.with_(index_bits=16),
                          "online: mean_abs (default)": base, "online: std": base.with_(index_channel_metric="std"),
                          "online: pca basis": base.with_(index_basis="pca"),
                          "block-only, pca basis": base.with_(mode="block_only", index_basis="pca")}
                rows = dict(zip(online, selection_recall(layers, online.values())))
                for fname, cal in files.items():
                    rows[fname] = selection_recall(layers, [base], calibration=cal)[0]
                for w in args.block_bound_weights:
                    weighted = {f"online, block_bound_weight {w}": base.with_(block_bound_weight=w),
                                f"block-only, block_bound_weight {w}": base.with_(mode="block_only", block_bound_weight=w),
                                f"online: pca basis, block_bound_weight {w}": base.with_(index_basis="pca",
                                                                                          block_bound_weight=w)}
                    rows.update(zip(weighted, selection_recall(layers, weighted.values())))
                for row, r in rows.items():
                    sums.setdefault((name, budget, row), []).append(r["recall"])
    results = []
    for (name, budget, row), vals in sums.items():
        exact = sum(sums[(name, budget, "exact top-k")]) / len(vals)
        mean = sum(vals) / len(vals)
        results.append(dict(setting=name, budget=budget, row=row, recall=mean, over_exact=mean / exact))
    for name in settings:
        for budget in budgets:
            print(f"\n{name}, budget {budget} ({len(samples)} prompts x {args.steps} queries x 30 layers x 3 kv heads)")
            for r in results:
                if r["setting"] == name and r["budget"] == budget:
                    print(f"  {r['row']:38s} recall {r['recall']:.4f}   / exact top-k {r['over_exact']:.3f}")
    out = dict(model="SmolLM2-135M-Instruct", length=args.length, samples=len(samples), steps=args.steps,
               calibration_tokens=files["file: std + queries"].calibration_tokens, results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
