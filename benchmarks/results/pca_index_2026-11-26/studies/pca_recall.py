"""Recall with the index (block summaries and token codes) in a PCA basis of the keys: the whole problem
rotated by an orthogonal basis from a sample of keys (q.k unchanged), reference on the CPU."""
import math, sys, time
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

L, B, budgets = int(sys.argv[1]) if len(sys.argv) > 1 else 16384, 2, (2048, 1024, 512)
Hq, Hkv, D = 32, 8, 128
G = Hq // Hkv
CB = bsd.CACHE_BLOCK
for basis in ("channels", "pca_sample", "pca_per_seq"):
    gen = torch.Generator().manual_seed(0)
    keys, query = bsd.structured_keys(B, L, Hkv, D, G, gen)  # keys (B, L, Hkv, D), query (B, Hq, D)
    W = math.ceil(L / CB)
    table = torch.randperm(B * W, generator=gen).view(B, W).to(torch.int32)
    vals = None
    if basis != "channels":
        R = torch.zeros(B, Hkv, D, D)
        for h in range(Hkv):
            if basis == "pca_sample":
                sample = keys.reshape(B * L, Hkv, D)[: 8 * 1024, h]
                ev = torch.linalg.eigh(torch.cov(sample.T.double()) + torch.outer(sample.mean(0), sample.mean(0)).double())[1]
                R[:, h] = ev.flip(1).T.float()  # rows: directions by decreasing second moment
            else:
                for b in range(B):
                    sample = keys[b, :, h]
                    ev = torch.linalg.eigh((sample.T.double() @ sample.double()) / sample.shape[0])[1]
                    R[b, h] = ev.flip(1).T.float()
        keys = torch.einsum("bhed,blhd->blhe", R, keys)
        q = query.view(B, Hkv, G, D)
        query = torch.einsum("bhed,bhgd->bhge", R, q).reshape(B, Hq, D)
    key_cache = torch.zeros(B * W, CB, Hkv, D, dtype=torch.bfloat16)
    key_cache[table.long()] = keys.view(B, W, CB, Hkv, D).to(torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    seq_lens = torch.full((B,), L, dtype=torch.int32)
    qb = query.to(torch.bfloat16)
    scale = 1 / math.sqrt(D)
    for budget in budgets:
        t = time.time()
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=budget)
        index = ref.allocate_index(B * W, CB, Hkv, D, config, torch.bfloat16, "cpu")
        flat = keys.reshape(B * L, Hkv, D).to(torch.bfloat16)
        if basis == "channels":
            ids = ref.choose_index_channels(flat[: 8 * 1024], config.index_channels, metric=config.index_channel_metric)
        else:
            ids = torch.arange(config.index_channels).expand(Hkv, -1).contiguous()  # the leading directions
        ref.set_index_channels(index, ids)
        slots = (table.long().view(B, W, 1) * CB + torch.arange(CB)).view(-1)
        ref.write_index(index, flat, slots, config)
        row = {}
        for mode in ("asynctls", "block_only", "exact_topk"):
            _, pos, _ = ref.sparse_decode(qb, key_cache, value_cache, table, seq_lens, index, config.with_(mode=mode), scale)
            row[mode] = float(ref.attention_mass_recall(qb, key_cache, table, seq_lens, pos, scale).mean())
        print(f"L={L} {basis:12s} budget {budget}: asynctls {row['asynctls']:.4f} block_only {row['block_only']:.4f} "
              f"exact {row['exact_topk']:.4f} -> {row['asynctls'] / row['exact_topk']:.3f} ({time.time() - t:.0f} s)", flush=True)
