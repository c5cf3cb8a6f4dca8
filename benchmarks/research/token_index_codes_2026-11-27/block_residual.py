"""Research (not shipped): the token score plus the estimate of the unindexed channels' part of q . k from the
token's block summary, `alpha * q_rest . (min + max) / 2` ("rest"), or `alpha * q . (min + max) / 2` ("all"), on
the benchmark's planted keys at 16K (B=2, budget 2048, 128 blocks of 64, 32 channels at 4 bits).

    python block_residual.py 16384
"""
import os, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode_reference as ref

MODE = {"v": None, "alpha": 1.0}
orig = ref._index_scores

def patched(query, index, key_cache, block_table, positions, config, softmax_scale=None):
    if MODE["v"] is None or config.index_bits == 16:
        return orig(query, index, key_cache, block_table, positions, config, softmax_scale)
    Hkv = positions.shape[1]
    q = ref._grouped_query(ref.rotate_query(query, index), Hkv)  # (B,Hkv,G,D)
    C = config.index_channels
    codes = ref._gather_tokens(index.codes, block_table, positions)
    scales = ref._gather_tokens(index.scales.unsqueeze(-1), block_table, positions).squeeze(-1)
    approx = ref.dequantize_index(codes, scales, config.index_bits, C)
    channels = index.channel_ids.view(1, Hkv, 1, C).expand(q.shape[0], -1, q.shape[2], -1)
    q_c = q.gather(-1, channels)
    scores = torch.einsum("bhgc,bhpc->bhgp", q_c, approx)
    # block midpoint of each position's selection block
    S = config.selection_block_size
    cbs = key_cache.shape[1]
    pos = positions.long()
    B, _, P = pos.shape
    physical = block_table.long().gather(1, (pos // cbs).view(B, Hkv * P)).view(B, Hkv, P)
    sub = (pos % cbs) // S
    heads = torch.arange(Hkv).view(1, Hkv, 1)
    bs = index.block_scale[physical, sub, heads]  # (B,Hkv,P)
    mn = index.block_min[physical, sub, heads].float() * bs.unsqueeze(-1)
    mx = index.block_max[physical, sub, heads].float() * bs.unsqueeze(-1)
    mid = (mn + mx) * 0.5  # (B,Hkv,P,D)
    q_rest = q.clone()
    if MODE["v"] == "rest":
        q_rest.scatter_(-1, channels, 0.0)
    scores = scores + MODE["alpha"] * torch.einsum("bhgd,bhpd->bhgp", q_rest, mid)
    return ref._combine_group(scores, config, ref.group_temperature(softmax_scale, query.shape[-1]))

ref._index_scores = patched
L = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
for v, alpha in [(None, 0), ("rest", 1.0), ("rest", 0.5), ("all", 0.5)]:
    MODE.update(v=v, alpha=alpha)
    t = time.time()
    rows = bsd.recall_rows(L, [2048], B=2, device="cpu")
    print(v, alpha, {k: round(rows[0][k], 4) for k in ("asynctls", "block_only", "exact_topk", "asynctls_over_exact")}, f"{time.time()-t:.0f}s", flush=True)
