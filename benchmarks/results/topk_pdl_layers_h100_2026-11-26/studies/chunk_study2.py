"""Batch chunks on concurrent streams, standard step (PDL as the operator chooses), GQA and MLA."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton
OUT = os.environ.get("OUT", "/tmp")
res = []
streams = [torch.cuda.Stream(priority=-100) for _ in range(4)]
def run(label, B, q, kc, vc, table, seq_lens, index, config, scale, Hq, Hkv, Dk, Dv):
    for chunks in (1, 2, 3, 4):
        if chunks > B:
            continue
        bounds = [round(i * B / chunks) for i in range(chunks + 1)]
        parts = []
        for i in range(chunks):
            sl = slice(bounds[i], bounds[i + 1])
            ws = SparseDecodeWorkspace(sl.stop - sl.start, Hq, Hkv, Dk, Dv, table.shape[1], bsd.CACHE_BLOCK, config, q.dtype, "cuda")
            parts.append((sl, ws))
        def step():
            if chunks == 1:
                return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, workspace=parts[0][1])
            main = torch.cuda.current_stream()
            for i, (sl, ws) in enumerate(parts):
                streams[i].wait_stream(main)
                with torch.cuda.stream(streams[i]):
                    sparse_decode_triton(q[sl], kc, vc, table[sl], seq_lens[sl], index, config, scale, workspace=ws)
            for i in range(chunks):
                main.wait_stream(streams[i])
        us = bsd.graph_time_ms(step) * 1e3
        row = dict(kind=label, B=B, L=int(seq_lens[0]), chunks=chunks, us=us)
        res.append(row); print(row, flush=True)
for L in (65536, 131072):
    for B in (2, 4, 8, 16, 32):
        if B * L > 32 * 65536:
            continue
        config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)
        q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, 32, 8, 128, 128, config, seed=1)
        run("gqa", B, q, kc, vc, table, seq_lens, index, config, 1 / math.sqrt(128), 32, 8, 128, 128)
        del q, kc, vc, index; torch.cuda.empty_cache()
for H in (16, 128):
    B, L = 8, 65536
    Dk, Dv = 576, 512
    config = SparseAttentionConfig.for_mla(selection_block_size=64, num_blocks=128, token_budget=2048)
    q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, H, 1, Dk, Dv, config, mla=True, seed=H + L)
    run(f"mla H={H}", B, q, kc, vc, table, seq_lens, index, config, 1 / math.sqrt(192), H, 1, Dk, Dv)
    del q, kc, vc, index; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "chunk_study2.json"), "w"), indent=1)
