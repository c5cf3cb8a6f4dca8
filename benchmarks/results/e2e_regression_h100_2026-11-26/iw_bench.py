"""Index write per call (CUPTI kernel times): this code at decode and prefill call sizes, then the
writer of 7e07c93 at the same sizes. (The variant sweep of the summary kernel's scan, run before the
fix, is in index_write_variants_before_fix.json.)"""
import json, os, sys, itertools
# Ran from .baseline_kernels/ on the device, with the package of 7e07c93 in .baseline_kernels/e2e_old
# (git archive 7e07c93 pyproject.toml kernels vllm_asynctls trl_tip README.md) for the "old" rows.
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = next(p for p in [HERE, *[os.path.join(HERE, *[".."] * k) for k in range(1, 5)]]
            if os.path.exists(os.path.join(p, "benchmarks", "profile_sparse_decode.py")))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import torch, triton
from profile_sparse_decode import kernel_times_us
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels import index_write as iw
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
HKV, D, CBS = 8, 128, 64
NB = 6000
config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
g = torch.Generator(device="cuda").manual_seed(0)
index = ref.allocate_index(NB, CBS, HKV, D, config, torch.bfloat16, "cuda")
ref.set_index_channels(index, ref.choose_index_channels(torch.randn(256, HKV, D, device="cuda"), 32))
ws = iw.IndexWriteWorkspace(NB, index.block_min.shape[1], "cuda")
out = {}

def case(n, real, same_block):
    key = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    slots = torch.full((n,), -1, dtype=torch.int64, device="cuda")
    if same_block:
        slots[:real] = 77 * CBS + 5 + torch.arange(real, device="cuda")
    else:
        slots[:real] = (100 + torch.arange(real, device="cuda")) * CBS + 5
    return key, slots

def launch(key, slots, block_t=8, block_scan=256, stages=None, warps=4):
    N = key.shape[0]
    C = index.channel_ids.shape[1]
    cs, ss = index.codes.stride(), index.scales.stride()
    iw._index_codes_kernel[(N,)](key, slots, index.channel_ids, index.codes, index.scales, ws.claim,
        key.stride(0), key.stride(1), key.stride(2), cs[0], cs[1], cs[2], cs[3], ss[0], ss[1], ss[2],
        HKV=HKV, C=C, BITS=4, CBS=CBS, SBS=64, BLOCK_H=8, BLOCK_C=16, STORE_DTYPE=triton.language.bfloat16, num_warps=1)
    kw = dict(num_warps=warps)
    if stages: kw["num_stages"] = stages
    iw._index_summary_kernel[(N,)](key, slots, index.block_min, index.block_max, index.block_scale, ws.claim, N,
        key.stride(0), key.stride(1), key.stride(2), HKV=HKV, D=D, SBS=64, KEY_DTYPE=triton.language.bfloat16,
        TOL=iw.SUMMARY_TOL, QMAX=127.0, BLOCK_H=8, BLOCK_D=128, BLOCK_SCAN=block_scan, BLOCK_T=block_t, **kw)

def summ(t):
    return {k: round(v, 2) for k, v in t.items() if "summary" in k or "codes" in k}

CASES = [(8, 5, False), (8, 5, True), (8, 1, False), (64, 64, True), (1024, 1024, True), (16384, 16384, "aligned"), (8192, 8192, "aligned")]
def case2(n, real, same):
    if same == "aligned":
        key = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
        blocks = torch.randperm(NB - 1, device="cuda", generator=g)[: n // CBS] + 1
        slots = (blocks.view(-1, 1) * CBS + torch.arange(CBS, device="cuda")).view(-1)
        return key, slots
    return case(n, real, same)
for n, real, same in CASES:
    key, slots = case2(n, real, same)
    out[f"head n={n} real={real} same={same}"] = summ(kernel_times_us(lambda: iw.write_index_triton(index, key, slots, config, ws), iters=5))
    print(list(out.items())[-1], flush=True)
# old code (7e07c93)
sys.path.insert(0, os.path.join(HERE, "e2e_old"))
import importlib
oldref = importlib.import_module("kernels.sparse_decode_reference")
oldiw = importlib.import_module("kernels.index_write")
oldcfg = importlib.import_module("kernels.sparse_config").SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
oidx = oldref.allocate_index(NB, CBS, HKV, D, oldcfg, torch.bfloat16, "cuda")
oldref.set_index_channels(oidx, oldref.choose_index_channels(torch.randn(256, HKV, D, device="cuda"), 32))
ows = oldiw.IndexWriteWorkspace(NB, oidx.block_min.shape[1], "cuda")
for n, real, same in CASES:
    key, slots = case2(n, real, same)
    out[f"old n={n} real={real} same={same}"] = summ(kernel_times_us(lambda: oldiw.write_index_triton(oidx, key, slots, oldcfg, ows), iters=5))
    print(list(out.items())[-1], flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "iw_bench.json"), "w"), indent=1)
