"""Does splitting the decode batch over concurrent streams fill the SMs the per-row stages leave idle?"""
import json, math, os, sys
import torch, triton
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, sparse_decode_triton

OUT = os.environ.get("OUT", "/tmp")
res = dict(device=torch.cuda.get_device_name(0), rows=[])
x = torch.zeros(1, device="cuda")
res["graph_tiny_kernel_us"] = bsd.graph_time_ms(lambda: x.add_(1)) * 1e3
print("tiny graph", res["graph_tiny_kernel_us"], flush=True)
Hq, Hkv, D = 32, 8, 128
streams = [torch.cuda.Stream(priority=-100) for _ in range(8)]
for L in (65536, 131072):
    for B in (8, 32):
        if B == 32 and L == 131072:
            continue
        for lagged in (False, True):
            config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048, lagged_selection=lagged)
            q, kc, vc, table, seq_lens, index = bsd.paged_case(B, L, Hq, Hkv, D, D, config, seed=1)
            scale = 1 / math.sqrt(D)
            for chunks in (1, 2, 4, 8):
                if chunks > B:
                    continue
                c = B // chunks
                parts = []
                for i in range(chunks):
                    sl = slice(i * c, (i + 1) * c)
                    ws = SparseDecodeWorkspace(c, Hq, Hkv, D, D, table.shape[1], bsd.CACHE_BLOCK, config, q.dtype, "cuda")
                    prev = None
                    if lagged:
                        _, _, prev = sparse_decode_triton(q[sl], kc, vc, table[sl], seq_lens[sl], index, config.with_(lagged_selection=False), scale)
                        prev = prev.clone()
                    parts.append((sl, ws, prev))
                def step():
                    if chunks == 1:
                        sl, ws, prev = parts[0]
                        return sparse_decode_triton(q, kc, vc, table, seq_lens, index, config, scale, previous_block_ids=prev, workspace=ws)
                    main = torch.cuda.current_stream()
                    for i, (sl, ws, prev) in enumerate(parts):
                        s = streams[i]
                        s.wait_stream(main)
                        with torch.cuda.stream(s):
                            sparse_decode_triton(q[sl], kc, vc, table[sl], seq_lens[sl], index, config, scale, previous_block_ids=prev, workspace=ws)
                    for i in range(chunks):
                        main.wait_stream(streams[i])
                us = bsd.graph_time_ms(step) * 1e3
                row = dict(L=L, B=B, lagged=lagged, chunks=chunks, us=us)
                res["rows"].append(row)
                print(row, flush=True)
            del q, kc, vc, index
            torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "chunk_study.json"), "w"), indent=1)
