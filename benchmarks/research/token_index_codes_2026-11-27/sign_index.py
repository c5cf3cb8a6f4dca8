"""Research (not shipped): the token index at the shipped index's bytes per token, coded differently: C channels
at b bits with C * b = 4 * index_channels (128 channels at 1 bit: the sign, times the token's mean |k|; 64 at 2
bits), optionally centred on the keys' channel means. Patches the reference's `_index_scores` (keys gathered
from the cache and quantised in place, so only the codes' information differs).

    python sign_index.py planted 16384   # the benchmark's planted keys, B=2, budget 2048, 128 blocks of 64
    python sign_index.py smollm2 2       # SmolLM2-135M's own keys at 8K, 2 prompts, the selection at 64K's shares
"""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from asynctls_tip_kernels import sparse_decode_reference as ref

MODE = {"v": None}
orig = ref._index_scores

def quant(x, bits):
    if bits == 1:
        return torch.sign(x) * x.abs().mean(-1, keepdim=True)
    levels = 2 ** bits
    amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    step = 2 * amax / levels
    qx = torch.clamp(torch.floor(x / step) + 0.5, -levels / 2 + 0.5, levels / 2 - 0.5)
    return qx * step

def patched(query, index, key_cache, block_table, positions, config, softmax_scale=None):
    v = MODE["v"]
    if v is None or config.index_bits == 16:
        return orig(query, index, key_cache, block_table, positions, config, softmax_scale)
    bits, centered = v
    Hkv = positions.shape[1]
    q = ref._grouped_query(query, Hkv)
    C = config.index_channels
    keys = ref._gather_tokens(key_cache, block_table, positions).float()
    if centered:
        mu = key_cache.float().reshape(-1, Hkv, key_cache.shape[-1]).mean(0)  # (Hkv, D)
        keys = keys - mu.view(1, Hkv, 1, -1)
    ch = index.channel_ids.view(1, Hkv, 1, C)
    kc = keys.gather(-1, ch.expand(keys.shape[0], -1, keys.shape[2], -1))
    approx = quant(kc, bits)
    q_c = q.gather(-1, ch.expand(q.shape[0], -1, q.shape[2], -1))
    scores = torch.einsum("bhgc,bhpc->bhgp", q_c, approx)
    return ref._combine_group(scores, config, ref.group_temperature(softmax_scale, query.shape[-1]))

ref._index_scores = patched
VARIANTS_PLANTED = [(32, None), (32, (4, False)), (32, (4, True)), (128, (1, False)), (128, (1, True)), (64, (2, True))]

def planted(L):
    import bench_sparse_decode as bsd
    for C, v in VARIANTS_PLANTED:
        MODE["v"] = v
        rows = bsd.recall_rows(L, [2048], B=2, device="cpu", index_channels=C)
        print("planted", L, C, v, {k: round(rows[0][k], 4) for k in ("asynctls", "exact_topk", "asynctls_over_exact")}, flush=True)

def smollm2(samples=2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
    from vllm_asynctls.evaluation import long_context_suite as suite
    from vllm_asynctls.evaluation.real_model import smollm2_checkpoint
    from vllm_asynctls.evaluation.recall import capture_qk, selection_recall
    torch.manual_seed(0)
    path = str(smollm2_checkpoint())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sums = {}
    for s in suite.build_suite(tok, [8192], 1, seed=0)[:samples]:
        ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
        layers = capture_qk(model, ids, list(range(len(ids) - 4, len(ids))))
        for sbs, nb in ((64, 16), (16, 64)):
            base = SparseAttentionConfig(token_budget=256, index_channels=16, selection_block_size=sbs, num_blocks=nb)
            for name, cfg, v in [("exact", base.with_(mode="exact_topk"), None), ("cap", base.with_(index_bits=16), None),
                                 ("shipped 16x4", base, None), ("16x4 c", base, (4, True)),
                                 ("64x1", base.with_(index_channels=64), (1, False)),
                                 ("64x1 c", base.with_(index_channels=64), (1, True)),
                                 ("32x2 c", base.with_(index_channels=32), (2, True))]:
                MODE["v"] = v
                r = selection_recall(layers, [cfg])[0]["recall"]
                sums.setdefault((sbs, name), []).append(r)
    for (sbs, name), vals in sums.items():
        ex = sum(sums[(sbs, "exact")]) / len(vals)
        print("smollm2 block", sbs, name, round(sum(vals) / len(vals), 4), "/exact", round(sum(vals) / len(vals) / ex, 3), flush=True)

if __name__ == "__main__":
    if sys.argv[1] == "planted":
        planted(int(sys.argv[2]))
    else:
        smollm2(int(sys.argv[2]))
