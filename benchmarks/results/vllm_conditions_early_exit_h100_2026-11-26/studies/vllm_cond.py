"""Standard and lagged step under vLLM's conditions (cache layout, padded batch, table as wide as the
model's longest context), 4 layers in one graph; kernels from PYTHONPATH."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode_reference as ref
from asynctls_tip_kernels.index_write import IndexWriteWorkspace, write_index_triton
from asynctls_tip_kernels import sparse_decode as sd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
OUT = os.environ.get("OUT", "/tmp"); TAG = sys.argv[1]
HQ, HKV, D, CBS = 32, 8, 128, 64

def layer(real, batch, context, max_len, config, g):
    per_seq = context // CBS
    nb = real * per_seq + 2
    kv = torch.randn(nb, HKV, CBS, 2 * D, device="cuda", dtype=torch.bfloat16, generator=g)
    kc, vc = kv.transpose(1, 2).split(D, dim=-1)
    width = math.ceil(max_len / CBS)
    table = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    table[:real, :per_seq] = (torch.randperm(nb - 2, device="cuda", generator=g).to(torch.int32) + 1).view(real, per_seq)
    seq = torch.zeros(batch, dtype=torch.int32, device="cuda"); seq[:real] = context
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    index = ref.allocate_index(nb, CBS, HKV, D, config, torch.bfloat16, "cuda")
    ref.set_index_channels(index, ref.choose_index_channels(kc[table[0, :64].long()].reshape(-1, HKV, D), config.index_channels))
    wws = IndexWriteWorkspace(nb, index.block_min.shape[1], "cuda")
    for b in range(real):
        for c0 in range(0, per_seq, 256):
            blocks = table[b, c0:c0 + 256].long()
            slots = (blocks.view(-1, 1) * CBS + torch.arange(CBS, device="cuda")).view(-1)
            write_index_triton(index, kc[blocks].reshape(-1, HKV, D), slots, config, wws)
    return q, kc, vc, table, seq, index

res = []
scale = 1 / math.sqrt(D)
for real, batch, context, max_len in ((5, 8, 65536, 98440), (8, 8, 65536, 131072), (5, 8, 131072, 131072)):
    base = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
    g = torch.Generator(device="cuda").manual_seed(0)
    stack = [layer(real, batch, context, max_len, base, g) for _ in range(4)]
    for lagged in (False, True):
        cfg = base.with_(lagged_selection=lagged)
        ws = sd.SparseDecodeWorkspace(batch, HQ, HKV, D, D, stack[0][3].shape[1], CBS, cfg, torch.bfloat16, "cuda")
        prevs = [sd.sparse_decode_triton(*s, base, scale)[2].clone() if lagged else None for s in stack]
        out = sd.sparse_decode_triton(*stack[0], cfg, scale, previous_block_ids=prevs[0])
        fns = [(lambda i=i: sd.sparse_decode_triton(*stack[i], cfg, scale, previous_block_ids=prevs[i], workspace=ws)) for i in range(4)]
        own = bsd.graph_time_ms(fns[0]) * 1e3
        per = bsd.stacked_time_ms(fns) * 1e3
        row = dict(tag=TAG, real=real, batch=batch, context=context, max_len=max_len, lagged=lagged, own_us=own, per_layer_us=per,
                   out_sum=float(out[0].float().abs().sum()), pos_sum=int(out[1].long().sum()))
        res.append(row); print(row, flush=True)
        del ws
    del stack; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, f"vllm_cond_{TAG}.json"), "w"), indent=1)
