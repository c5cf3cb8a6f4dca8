"""Recall when each token's index score gets its block's estimate of the unselected channels'
contribution: q_rest . (min + max) / 2 from the block summaries. Usage: recall_blockterm.py ALPHA CONTEXT..."""
import sys, math, torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode_reference as ref
ALPHA = float(sys.argv[1])
orig = ref._index_scores
def patched(query, index, key_cache, block_table, positions, config, softmax_scale=None):
    if config.index_bits == 16 or ALPHA == 0:
        return orig(query, index, key_cache, block_table, positions, config, softmax_scale)
    B, Hkv, P = positions.shape
    S = config.selection_block_size
    CBS = index.codes.shape[1]
    q = ref._grouped_query(query, Hkv)  # (B, Hkv, G, D)
    D = q.shape[-1]
    C = config.index_channels
    channels = index.channel_ids.view(1, Hkv, 1, C).expand(B, -1, q.shape[2], -1)
    q_c = q.gather(-1, channels)
    codes = ref._gather_tokens(index.codes, block_table, positions)
    scales = ref._gather_tokens(index.scales.unsqueeze(-1), block_table, positions).squeeze(-1)
    approx = ref.dequantize_index(codes, scales, config.index_bits, C)
    scores = torch.einsum("bhgc,bhpc->bhgp", q_c, approx)
    rest = torch.ones(Hkv, D)
    rest.scatter_(1, index.channel_ids.long(), 0.0)
    q_rest = q * rest.view(1, Hkv, 1, D)
    # one term per (row, logical block): blocks of the positions
    W = block_table.shape[1]
    per = index.blocks_per_cache_block
    phys = block_table.long().clamp(min=0)
    bs = index.block_scale[phys]
    mins = ref.dequantize_summary(index.block_min[phys], bs).view(B, W * per, Hkv, D)
    maxs = ref.dequantize_summary(index.block_max[phys], bs).view(B, W * per, Hkv, D)
    mid = (mins + maxs) / 2
    term = torch.einsum("bhgd,bnhd->bhgn", q_rest, mid)  # (B, Hkv, G, NS)
    blk = (positions.long() // S).clamp(min=0)  # (B, Hkv, P)
    t = term.gather(-1, blk.unsqueeze(2).expand(-1, -1, q.shape[2], -1))
    scores = scores + ALPHA * t
    return ref._combine_group(scores, config, ref.group_temperature(softmax_scale, query.shape[-1]))
ref._index_scores = patched
for L in (int(a) for a in sys.argv[2:]):
    bsd.recall_rows(L, [2048, 1024, 512], B=2, device="cpu")
