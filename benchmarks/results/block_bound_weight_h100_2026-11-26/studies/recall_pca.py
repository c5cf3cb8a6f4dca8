"""Recall with a PCA-projected token index (Loki-style): 32 principal directions of the calibration keys
per kv head instead of 32 raw channels, 4-bit codes of (k - mean) @ R, q @ R as the index query, plus
q . mean per head. Usage: recall_pca.py [--nomean] CONTEXT..."""
import sys, math, torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode_reference as ref
NOMEAN = "--nomean" in sys.argv
BASIS = {}
orig_choose = ref.choose_index_channels
def choose(keys, num_channels, metric="mean_abs", queries=None):
    k = keys.float()  # (N, Hkv, D)
    mu = k.mean(0)  # (Hkv, D)
    xc = (k - mu).transpose(0, 1)  # (Hkv, N, D)
    cov = xc.transpose(1, 2) @ xc / k.shape[0]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    BASIS["R"] = evecs[..., -num_channels:].flip(-1)  # (Hkv, D, C)
    BASIS["mu"] = mu
    return orig_choose(keys, num_channels, metric, queries)
ref.choose_index_channels = choose
orig = ref._index_scores
def patched(query, index, key_cache, block_table, positions, config, softmax_scale=None):
    if config.index_bits == 16:
        return orig(query, index, key_cache, block_table, positions, config, softmax_scale)
    Hkv = positions.shape[1]
    q = ref._grouped_query(query, Hkv)  # (B, Hkv, G, D)
    R, mu = BASIS["R"], BASIS["mu"]
    if NOMEAN:
        mu = torch.zeros_like(mu)
    keys = ref._gather_tokens(key_cache, block_table, positions).float()  # (B, Hkv, P, D)
    y = torch.einsum("bhpd,hdc->bhpc", keys - mu.view(1, Hkv, 1, -1), R)
    codes, scales = ref.quantize_index(y, config.index_bits)
    approx = ref.dequantize_index(codes, scales, config.index_bits, y.shape[-1])
    qr = torch.einsum("bhgd,hdc->bhgc", q, R)
    scores = torch.einsum("bhgc,bhpc->bhgp", qr, approx) + torch.einsum("bhgd,hd->bhg", q, mu).unsqueeze(-1)
    return ref._combine_group(scores, config, ref.group_temperature(softmax_scale, query.shape[-1]))
ref._index_scores = patched
for L in (int(a) for a in sys.argv[1:] if not a.startswith("--")):
    bsd.recall_rows(L, [2048, 1024, 512], B=int(__import__("os").environ.get("RB", 2)), device="cpu")
