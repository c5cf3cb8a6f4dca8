"""SmolLM2 real keys at 8K, 64K ratios: cap with exact token scores inside blocks chosen by (a) min/max bound,
(b) oracle true max of the exact group score, (c) oracle block mass; plus block mean-key score."""
import sys, math, torch
from transformers import AutoTokenizer, AutoModelForCausalLM
from vllm_asynctls.evaluation.real_model import smollm2_checkpoint
from vllm_asynctls.evaluation import long_context_suite as suite
from vllm_asynctls.evaluation.recall import capture_qk, selection_recall
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
torch.set_num_threads(2)
path = str(smollm2_checkpoint()); tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
samples = suite.build_suite(tok, [8192], 1, 0)[:int(sys.argv[1]) if len(sys.argv) > 1 else 2]
orig_blocks, orig_dec = ref.score_blocks, ref.sparse_decode
STATE = {"mode": None, "keys": None, "scale": None}
def dec(query, key_cache, value_cache, block_table, seq_lens, index, config, scale, *a, **k):
    STATE["keys"], STATE["scale"] = key_cache, scale
    return orig_dec(query, key_cache, value_cache, block_table, seq_lens, index, config, scale, *a, **k)
def blocks(query, index, block_table, seq_lens, config, softmax_scale=None):
    bound = orig_blocks(query, index, block_table, seq_lens, config, softmax_scale)
    if STATE["mode"] is None:
        return bound
    B, Hkv, NS = bound.shape; S = config.selection_block_size
    pos = torch.arange(NS * S).view(1, 1, -1).expand(B, Hkv, -1)
    ex = config.with_(index_bits=16)
    if STATE["mode"] == "mean":  # score of the block's mean key
        keys = ref._gather_tokens(STATE["keys"], block_table, pos).float().view(B, Hkv, NS, S, -1)
        cand = ref._is_candidate(pos, seq_lens, config).view(B, Hkv, NS, S, 1)
        mean = (keys * cand).sum(3) / cand.sum(3).clamp(min=1)
        q = ref._grouped_query(query, Hkv)
        s = torch.einsum("bhgd,bhnd->bhgn", q, mean)
        s = ref._combine_group(s, config, ref.group_temperature(softmax_scale, query.shape[-1]))
        return s.masked_fill(torch.isinf(bound), float("-inf"))
    s = ref._index_scores(query, index, STATE["keys"], block_table, pos, ex, softmax_scale)
    s = s.masked_fill(~ref._is_candidate(pos, seq_lens, config), float("-inf")).view(B, Hkv, NS, S)
    t = ref.group_temperature(softmax_scale, query.shape[-1])
    s = s.mul(t).logsumexp(-1) if STATE["mode"] == "mass" else s.amax(-1)
    return s.masked_fill(torch.isinf(bound), float("-inf"))
ref.score_blocks, ref.sparse_decode = blocks, dec
tot = {}
for s in samples:
    ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
    layers = capture_qk(model, ids, list(range(len(ids) - 4, len(ids))))
    for name, kw in {"b64x16": dict(selection_block_size=64, num_blocks=16), "b16x64": dict(selection_block_size=16, num_blocks=64)}.items():
        base = SparseAttentionConfig(token_budget=256, index_channels=16, **kw)
        STATE["mode"] = None
        r = selection_recall(layers, [base.with_(mode="exact_topk"), base.with_(index_bits=16), base])
        tot.setdefault((name, "exact"), []).append(r[0]["recall"]); tot.setdefault((name, "cap minmax"), []).append(r[1]["recall"])
        tot.setdefault((name, "asynctls minmax"), []).append(r[2]["recall"])
        for mode in ("max", "mass", "mean"):
            STATE["mode"] = mode
            r = selection_recall(layers, [base.with_(index_bits=16), base])
            tot.setdefault((name, f"cap {mode}"), []).append(r[0]["recall"]); tot.setdefault((name, f"asynctls {mode}"), []).append(r[1]["recall"])
        STATE["mode"] = None
for (name, row), v in sorted(tot.items()):
    ex = sum(tot[(name, "exact")]) / len(v)
    print(f"{name} {row:18s} {sum(v)/len(v):.4f} / exact {sum(v)/len(v)/ex:.3f}")
