"""Recall on SmolLM2-135M's own keys with the index in a PCA basis of the prompt's keys (per layer and kv
head, uncentred second moment), against the keys' own channels; the selection scaled to 64K's shares."""
import sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from vllm_asynctls.evaluation import long_context_suite as suite
from vllm_asynctls.evaluation.real_model import smollm2_checkpoint
from vllm_asynctls.evaluation.recall import capture_qk, selection_recall, LayerQK

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.manual_seed(0)
path = str(smollm2_checkpoint())
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
samples = suite.build_suite(tok, [8192], 1, seed=0)[:N]


def rotated(layer):
    T, Hkv, D = layer.keys.shape
    G = layer.queries.shape[1] // Hkv
    keys, queries = layer.keys.clone(), layer.queries.clone()
    for h in range(Hkv):
        k = layer.keys[:, h].double()
        R = torch.linalg.eigh(k.T @ k / T)[1].flip(1).T.float()  # rows: directions by decreasing second moment
        keys[:, h] = layer.keys[:, h] @ R.T
        queries[:, h * G:(h + 1) * G] = layer.queries[:, h * G:(h + 1) * G] @ R.T
    return LayerQK(queries, keys, layer.positions, layer.scale)


sums = {}
t0 = time.time()
for s in samples:
    ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
    layers = capture_qk(model, ids, list(range(len(ids) - 4, len(ids))))
    rot = [rotated(l) for l in layers]
    for name, kw in {"block 64, 16 blocks": dict(selection_block_size=64, num_blocks=16),
                     "block 16, 64 blocks": dict(selection_block_size=16, num_blocks=64)}.items():
        for budget in (256, 128):
            base = SparseAttentionConfig(token_budget=budget, index_channels=16, **kw)
            cfgs = {"exact": base.with_(mode="exact_topk"), "block-only": base.with_(mode="block_only"),
                    "cap": base.with_(index_bits=16), "asynctls": base}
            for basis, ls in (("channels", layers), ("pca", rot)):
                for (row, r) in zip(cfgs, selection_recall(ls, cfgs.values())):
                    sums.setdefault((name, budget, basis, row), []).append(r["recall"])
    print(f"prompt done {time.time() - t0:.0f} s", flush=True)
for name in ("block 64, 16 blocks", "block 16, 64 blocks"):
    for budget in (256, 128):
        ex = sum(sums[(name, budget, "channels", "exact")]) / N
        line = f"{name}, budget {budget}:"
        for basis in ("channels", "pca"):
            for row in ("block-only", "cap", "asynctls"):
                line += f"  {basis}/{row} {sum(sums[(name, budget, basis, row)]) / N / ex:.3f}"
        print(line, flush=True)
