"""Block score = q.mid + alpha * (bound - q.mid) from the same min/max summaries (alpha 1 = Quest bound).
Usage: alpha_blocks.py real N | synth CONTEXT..."""
import sys, math, torch
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
torch.set_num_threads(2)
ALPHA = {"a": 1.0}
def blocks(query, index, block_table, seq_lens, config, softmax_scale=None):
    S = config.selection_block_size; per = index.blocks_per_cache_block; B, W = block_table.shape
    Hkv, D = index.block_min.shape[2], index.block_min.shape[3]
    phys = block_table.long().clamp(min=0); bs = index.block_scale[phys]
    mins = ref.dequantize_summary(index.block_min[phys], bs).view(B, W * per, Hkv, D)
    maxs = ref.dequantize_summary(index.block_max[phys], bs).view(B, W * per, Hkv, D)
    q = ref._grouped_query(query, Hkv); a = ALPHA["a"]
    qmax = torch.where(q > 0, q * (1 + a) / 2, q * (1 - a) / 2)
    qmin = torch.where(q < 0, q * (1 + a) / 2, q * (1 - a) / 2)
    s = torch.einsum("bhgd,bnhd->bhgn", qmax, maxs) + torch.einsum("bhgd,bnhd->bhgn", qmin, mins)
    s = ref._combine_group(s, config, ref.group_temperature(softmax_scale, D))
    start = torch.arange(W * per).view(1, -1) * S
    first = torch.clamp(start, min=config.sink_tokens)
    end = torch.minimum(start + S, (seq_lens.long() - config.local_tokens).view(-1, 1))
    return s.masked_fill(~(first < end).unsqueeze(1), float("-inf"))
ref.score_blocks = blocks
alphas = tuple(float(a) for a in __import__("os").environ.get("ALPHAS", "1.0,0.75,0.5,0.25,0.0").split(","))
if sys.argv[1] == "real":
    from transformers import AutoTokenizer, AutoModelForCausalLM
    from vllm_asynctls.evaluation.real_model import smollm2_checkpoint
    from vllm_asynctls.evaluation import long_context_suite as suite
    from vllm_asynctls.evaluation.recall import capture_qk, selection_recall
    path = str(smollm2_checkpoint()); tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tot = {}
    for s in suite.build_suite(tok, [8192], 1, 0)[:int(sys.argv[2])]:
        ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
        layers = capture_qk(model, ids, list(range(len(ids) - 4, len(ids))))
        for name, kw in {"b64x16": dict(selection_block_size=64, num_blocks=16), "b16x64": dict(selection_block_size=16, num_blocks=64)}.items():
            base = SparseAttentionConfig(token_budget=int(__import__("os").environ.get("BUDGET", 256)), index_channels=16, **kw)
            tot.setdefault((name, "exact"), []).append(selection_recall(layers, [base.with_(mode="exact_topk")])[0]["recall"])
            for a in alphas:
                ALPHA["a"] = a
                r = selection_recall(layers, [base, base.with_(mode="block_only")])
                tot.setdefault((name, f"asynctls a={a}"), []).append(r[0]["recall"])
                tot.setdefault((name, f"block_only a={a}"), []).append(r[1]["recall"])
    for (name, row), v in sorted(tot.items()):
        ex = sum(tot[(name, "exact")]) / len(v)
        print(f"{name} {row:22s} {sum(v)/len(v):.4f} / exact {sum(v)/len(v)/ex:.3f}", flush=True)
else:
    sys.path.insert(0, "benchmarks"); import bench_sparse_decode as bsd
    for L in map(int, sys.argv[2:]):
        for a in alphas:
            ALPHA["a"] = a
            print(f"alpha={a}", flush=True)
            bsd.recall_rows(L, [2048], B=2, device="cpu")
