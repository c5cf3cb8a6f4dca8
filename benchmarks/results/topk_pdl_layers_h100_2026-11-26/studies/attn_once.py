import math, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels.sparse_attention import sparse_attention_triton
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton
B, L, Hq, Hkv, D = 8, 65536, 32, 8, 128
config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], bsd.CACHE_BLOCK, config, q.dtype, "cuda")
sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, 1 / math.sqrt(D), workspace=ws)
torch.cuda.synchronize()
pos = ws.positions.clone()
flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
for _ in range(3):
    flush.zero_()
    sparse_attention_triton(q, kc, vc, table, pos, 1 / math.sqrt(D))
torch.cuda.synchronize()
print("done")
