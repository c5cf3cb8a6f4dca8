"""Recall on SmolLM2-135M's own keys at 8K with the selection ratios of 64K (12.5% of tokens in kept
blocks, 3.1% budget): channel metrics mean_abs / std, a PCA-projected index, block-only, exact top-k.
Usage: real_key_recall.py [N_PROMPTS]"""
import sys, time, torch
from transformers import AutoTokenizer, AutoModelForCausalLM
from vllm_asynctls.evaluation.real_model import smollm2_checkpoint
from vllm_asynctls.evaluation import long_context_suite as suite
from vllm_asynctls.evaluation.recall import capture_qk, selection_recall
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
torch.set_num_threads(2)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2
path = str(smollm2_checkpoint())
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
samples = suite.build_suite(tok, [8192], 1, 0)[:N]
PCA = {"on": False}
BASIS = {}
orig_choose, orig_scores = ref.choose_index_channels, ref._index_scores
def choose(keys, num_channels, metric="mean_abs", queries=None):
    k = keys.float(); mu = k.mean(0); xc = (k - mu).transpose(0, 1)
    evals, evecs = torch.linalg.eigh(xc.transpose(1, 2) @ xc / k.shape[0])
    BASIS["R"], BASIS["mu"] = evecs[..., -num_channels:].flip(-1), mu
    return orig_choose(keys, num_channels, metric, queries)
def scores(query, index, key_cache, block_table, positions, config, softmax_scale=None):
    if not PCA["on"] or config.index_bits == 16:
        return orig_scores(query, index, key_cache, block_table, positions, config, softmax_scale)
    Hkv = positions.shape[1]; q = ref._grouped_query(query, Hkv); R, mu = BASIS["R"], BASIS["mu"]
    keys = ref._gather_tokens(key_cache, block_table, positions).float()
    y = torch.einsum("bhpd,hdc->bhpc", keys - mu.view(1, Hkv, 1, -1), R)
    codes, sc = ref.quantize_index(y, config.index_bits)
    approx = ref.dequantize_index(codes, sc, config.index_bits, y.shape[-1])
    s = torch.einsum("bhgc,bhpc->bhgp", torch.einsum("bhgd,hdc->bhgc", q, R), approx) + torch.einsum("bhgd,hd->bhg", q, mu).unsqueeze(-1)
    return ref._combine_group(s, config, ref.group_temperature(softmax_scale, query.shape[-1]))
ref.choose_index_channels, ref._index_scores = choose, scores
settings = {"block 64, 16 blocks": dict(selection_block_size=64, num_blocks=16),
            "block 16, 64 blocks": dict(selection_block_size=16, num_blocks=64)}
totals = {}
for si, s in enumerate(samples):
    ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
    t0 = time.time()
    layers = capture_qk(model, ids, list(range(len(ids) - 4, len(ids))))
    print(f"sample {si} ({s.task}, {len(ids)} tokens) captured in {time.time() - t0:.0f} s", flush=True)
    for name, kw in settings.items():
        for budget in (256, 128):
            base = SparseAttentionConfig(token_budget=budget, index_channels=16, **kw)
            cfgs = {"exact": base.with_(mode="exact_topk"), "block_only": base.with_(mode="block_only"),
                    "mean_abs": base, "std": base.with_(index_channel_metric="std"), "cap_exact_in_blocks": base.with_(index_bits=16)}
            res = dict(zip(cfgs, selection_recall(layers, cfgs.values())))
            PCA["on"] = True
            res["pca"] = selection_recall(layers, [base])[0]
            PCA["on"] = False
            for k, v in res.items():
                totals.setdefault((name, budget, k), []).append(v["recall"])
for (name, budget, k), v in sorted(totals.items()):
    ex = sum(totals[(name, budget, "exact")]) / len(v)
    m = sum(v) / len(v)
    print(f"{name}, budget {budget}: {k:10s} recall {m:.4f}  / exact {m / ex:.3f}")
