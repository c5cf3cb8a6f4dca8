"""Hybrid: block summaries in the keys' own basis, token codes in a per-sequence PCA basis (reference, CPU)."""
import math, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
L = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
B, Hq, Hkv, D, CB = 2, 32, 8, 128, bsd.CACHE_BLOCK
G = Hq // Hkv
for pca in ("per_seq", "batch"):
    gen = torch.Generator().manual_seed(0)
    keys, query = bsd.structured_keys(B, L, Hkv, D, G, gen)
    W = math.ceil(L / CB)
    table = torch.randperm(B * W, generator=gen).view(B, W).to(torch.int32)
    R = torch.zeros(B, Hkv, D, D)
    for h in range(Hkv):
        for b in range(B):
            sample = keys[b, :, h] if pca == "per_seq" else keys[:, :4096, h].reshape(-1, D)
            ev = torch.linalg.eigh((sample.T.double() @ sample.double()) / sample.shape[0])[1]
            R[b, h] = ev.flip(1).T.float()
    keys_r = torch.einsum("bhed,blhd->blhe", R, keys)
    query_r = torch.einsum("bhed,bhgd->bhge", R, query.view(B, Hkv, G, D)).reshape(B, Hq, D)

    def cache(k):
        c = torch.zeros(B * W, CB, Hkv, D, dtype=torch.bfloat16)
        c[table.long()] = k.view(B, W, CB, Hkv, D).to(torch.bfloat16)
        return c
    kc, kc_r = cache(keys), cache(keys_r)
    seq_lens = torch.full((B,), L, dtype=torch.int32)
    q, q_r = query.to(torch.bfloat16), query_r.to(torch.bfloat16)
    scale = 1 / math.sqrt(D)
    slots = (table.long().view(B, W, 1) * CB + torch.arange(CB)).view(-1)
    for nb in (128, 192):
        for budget in (2048, 1024, 512):
            config = SparseAttentionConfig(selection_block_size=64, num_blocks=nb, token_budget=budget)
            idx = ref.allocate_index(B * W, CB, Hkv, D, config, torch.bfloat16, "cpu")
            flat = keys.reshape(B * L, Hkv, D).to(torch.bfloat16)
            ref.set_index_channels(idx, ref.choose_index_channels(flat[: 8 * 1024], config.index_channels, metric=config.index_channel_metric))
            ref.write_index(idx, flat, slots, config)
            idx_r = ref.allocate_index(B * W, CB, Hkv, D, config, torch.bfloat16, "cpu")
            ref.set_index_channels(idx_r, torch.arange(config.index_channels).expand(Hkv, -1).contiguous())
            ref.write_index(idx_r, keys_r.reshape(B * L, Hkv, D).to(torch.bfloat16), slots, config)
            blocks = ref.select_blocks(q, idx, table, seq_lens, config, scale)
            sel = ref.select_tokens(q_r, idx_r, kc_r, table, seq_lens, blocks, config, scale)
            pos = ref.attended_positions(sel, seq_lens, config)
            hyb = float(ref.attention_mass_recall(q, kc, table, seq_lens, pos, scale).mean())
            _, pos_a, _ = ref.sparse_decode(q, kc, kc, table, seq_lens, idx, config, scale)
            base = float(ref.attention_mass_recall(q, kc, table, seq_lens, pos_a, scale).mean())
            ex = float(ref.attention_mass_recall(q, kc, table, seq_lens, ref.exact_topk_positions(q, kc, table, seq_lens, config, scale), scale).mean())
            # cap: exact scores inside the kept blocks
            cap_cfg = config.with_(index_bits=16)
            sel_c = ref.select_tokens(q, idx, kc, table, seq_lens, blocks, cap_cfg, scale)
            cap = float(ref.attention_mass_recall(q, kc, table, seq_lens, ref.attended_positions(sel_c, seq_lens, config), scale).mean())
            print(f"L={L} pca={pca} blocks {nb} budget {budget}: shipped {base / ex:.3f}  hybrid {hyb / ex:.3f}  cap {cap / ex:.3f}", flush=True)
