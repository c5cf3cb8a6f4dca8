import math, sys, torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
B, L = 8, 65536
config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
case = bsd.paged_case(B, L, 32, 8, 128, 128, config, seed=3)
scale = 1 / math.sqrt(128)
ws = sd.SparseDecodeWorkspace(B, 32, 8, 128, 128, case[3].shape[1], bsd.CACHE_BLOCK, config, torch.bfloat16, "cuda")
for _ in range(3):
    sd.sparse_decode_triton(*case, config, scale, workspace=ws)
torch.cuda.synchronize()
print("done")
