"""vLLM's HND cache layout (heads outside tokens within a cache block) vs NHD, same data and positions."""
import json, math, os, sys
import torch, triton
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".study")
import bench_sparse_decode as bsd
from asynctls_tip_kernels.sparse_attention import sparse_attention_triton
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton
from asynctls_tip_kernels import sparse_decode_reference as ref
OUT = os.environ.get("OUT", "/tmp")
res = []
Hq, Hkv, D = 32, 8, 128
for B, L, lagged in ((8, 65536, False), (8, 131072, False), (32, 65536, False), (8, 65536, True), (8, 131072, True)):
    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=lagged)
    q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
    scale = 1 / math.sqrt(D)
    # HND: storage (blocks, Hkv, CBS, D), viewed as (blocks, CBS, Hkv, D)
    kh = kc.transpose(1, 2).contiguous().transpose(1, 2)
    vh = vc.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(kh, kc) and kh.stride() != kc.stride()
    prev = sparse_decode_triton(q, kc, vc, table, seq_lens, index, config.with_(lagged_selection=False), scale)[2].clone() if lagged else None
    row = dict(B=B, L=L, lagged=lagged)
    outs = {}
    for name, k_, v_ in (("nhd", kc, vc), ("hnd", kh, vh)):
        ws = SparseDecodeWorkspace(B, Hq, Hkv, D, D, table.shape[1], bsd.CACHE_BLOCK, config, q.dtype, "cuda")
        o, pos, _ = sparse_decode_triton(q, k_, v_, table, seq_lens, index, config, scale, previous_block_ids=prev, workspace=ws)
        outs[name] = (o.clone(), pos.clone())
        step = lambda: sparse_decode_triton(q, k_, v_, table, seq_lens, index, config, scale, previous_block_ids=prev, workspace=ws)
        row[f"{name}_step_us"] = bsd.graph_time_ms(step) * 1e3
        row[f"{name}_step_us_4"] = bsd.stacked_time_ms([step] * 4) * 1e3
        pos_ = outs[name][1]
        att = lambda: sparse_attention_triton(q, k_, v_, table, pos_, scale, out=ws.out, workspace=ws.attention)
        row[f"{name}_attention_us_4"] = bsd.stacked_time_ms([att] * 4) * 1e3
    row["same_positions"] = bool(torch.equal(outs["nhd"][1], outs["hnd"][1]))
    row["max_out_diff"] = float((outs["nhd"][0].float() - outs["hnd"][0].float()).abs().max())
    res.append(row); print(row, flush=True)
    del q, kc, vc, kh, vh, index; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "hnd_study.json"), "w"), indent=1)
