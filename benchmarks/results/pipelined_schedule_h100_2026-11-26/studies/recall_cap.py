import sys, time, functools
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
bsd.SparseAttentionConfig = functools.partial(SparseAttentionConfig, index_bits=16)
for L in (int(a) for a in sys.argv[1:]):
    bsd.recall_rows(L, [2048], B=2, device="cpu")
