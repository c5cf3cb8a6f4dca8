import math, sys, torch, time
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import token_select as ts, sparse_decode as sd
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
Hq, Hkv, D, B, L = 32, 8, 128, 8, 65536
def t_us(fn, n=50):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1e3
for seed in (1, B * 7 + L):
    cfg = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=True, index_basis="pca")
    q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=seed)
    print("seed", seed, "q", q.shape, q.stride(), q.dtype, "basis", None if index.basis is None else (index.basis.shape, index.basis.stride()),
          "codes", index.codes.shape, index.codes.stride(), "ch", index.channel_ids[0, :8].tolist())
    blocks = sd.sparse_decode_triton(q, kc, vc, table, seq_lens, index, cfg, 1 / math.sqrt(D))[2].contiguous()
    heads = ts.word_score_heads(cfg, Hq // Hkv)
    iq = torch.empty(B, Hkv, cfg.index_channels, heads, device="cuda")
    qr = ref.rotate_query(q, index)
    out = torch.empty(B, Hkv, 128 * 64, device="cuda")
    a = t_us(lambda: ts.token_scores_triton(q, index, kc, table, seq_lens, blocks, cfg, out=out, index_query=iq, write_index_query=True))
    b = t_us(lambda: ts.token_scores_triton(qr, index, kc, table, seq_lens, blocks, cfg, out=out, index_query=iq, write_index_query=True, query_in_index_basis=True))
    c = t_us(lambda: ts.token_scores_triton(qr, index, kc, table, seq_lens, blocks, cfg, out=out, index_query=iq, query_in_index_basis=True))
    print(f"  scorer in-kernel rotation {a:.1f} us, pre-rotated + write {b:.1f}, pre-rotated, given iq {c:.1f}")
for dev_cache in ts._token_score_kernel.device_caches.values():
    for key, k in dev_cache[0].items():
        md = k.metadata
        print("variant regs", getattr(k, "n_regs", None), "spills", getattr(k, "n_spills", None), "shared", getattr(md, "shared", None), str(key)[-200:])
