"""Cap of recall when the 128 blocks are chosen by an oracle (the true per-block max of the exact group
score, or with --mass the block's softmax mass), with exact token scores inside: how much a better block
summary could give. Usage: python recall_oracle_blocks.py [--mass] CONTEXT ..."""
import sys, functools, math, torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
bsd.SparseAttentionConfig = functools.partial(SparseAttentionConfig, index_bits=16)
orig = ref.score_blocks
def oracle(query, index, block_table, seq_lens, config, softmax_scale=None):
    bound = orig(query, index, block_table, seq_lens, config, softmax_scale)  # for the -inf mask
    B, Hkv, NS = bound.shape
    S = config.selection_block_size
    pos = torch.arange(NS * S).view(1, 1, -1).expand(B, Hkv, -1)
    scores = ref._index_scores(query, index, ORACLE_KEYS[0], block_table, pos, config.with_(index_bits=16), softmax_scale)
    cand = ref._is_candidate(pos, seq_lens, config)
    scores = scores.masked_fill(~cand, float("-inf")).view(B, Hkv, NS, S)
    scores = scores.mul(TEMP).logsumexp(-1) if MASS else scores.amax(-1)
    return scores.masked_fill(torch.isinf(bound), float("-inf"))
ORACLE_KEYS = [None]
MASS = "--mass" in sys.argv
TEMP = 1 / math.sqrt(128)
orig_dec = ref.sparse_decode
def dec(query, key_cache, *a, **k):
    ORACLE_KEYS[0] = key_cache
    return orig_dec(query, key_cache, *a, **k)
ref.sparse_decode = dec
ref.score_blocks = oracle
for L in (int(a) for a in sys.argv[1:] if a != "--mass"):
    bsd.recall_rows(L, [2048], B=2, device="cpu")
