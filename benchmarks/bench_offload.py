"""KV offload data plane on the GPU (no vLLM): how much host-to-device copy time a decode step exposes.

Per layer: attention over the hot cache (`vllm_asynctls.offload.HotBlockCache`) with the blocks a
step selected that miss it copied from pinned host memory (`HostKVPool`) on a side stream, one
layer ahead (`Prefetcher`), the hint being the step's block selection (the paper's lagged selection:
blocks chosen one step earlier). Compute stand-in: the Triton sparse attention operator
(`asynctls_tip_kernels.sparse_attention.sparse_attention_triton`) over the folded heads, alone
("attn") and followed by a per-layer GEMV reading Qwen3-8B's layer weights ("attn+weights":
x (B, 4096) @ W (4096, 47104) bf16, 386 MB, i.e. the rest of a decode layer, which is what really
hides the copies). Every step is one CUDA graph replay (both streams captured; no host syncs).

Selection model: per (layer, request, kv head), 32 blocks of 64 tokens (budget 2048) among the
candidates of a 96K context, plus the pinned sink and local blocks; at miss rate r a step replaces
on average 32 r of the previous step's blocks with blocks never fetched (true misses).

Measured per miss rate: step time with offload (t_full), the same graph without any copy or
bookkeeping over resident blocks (t_compute), the copy work alone (t_copy: bookkeeping + copies,
side stream only), exposed share (t_full - t_compute) / t_full, bytes copied per step and the H2D
rate of the copies (bytes / t_copy). Host pool: requests alias the same host blocks and layers map
onto `--host-layers` pool layers, so 96 GiB of logical KV fit the machine; bytes moved are unchanged.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from asynctls_tip_kernels.sparse_attention import AttentionWorkspace, attention_plan, sparse_attention_triton
from vllm_asynctls.offload import HostKVPool, HotBlockCache, Prefetcher


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--context", type=int, default=96 * 1024)
    p.add_argument("--selected-blocks", type=int, default=32)
    p.add_argument("--hot-blocks", type=int, default=40)
    p.add_argument("--host-layers", type=int, default=8)
    p.add_argument("--miss-rates", default="0,0.02,0.05,0.1,0.25")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default=None)
    return p.parse_args()


def pinned_h2d_gbps(device, nbytes=256 << 20):
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - t) / 1e9


def main():
    a = parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    L, B, H, Hq, D, bs = a.layers, a.batch, a.kv_heads, a.q_heads, a.head_dim, a.block
    W = a.context // bs
    K = a.selected_blocks
    rates = [float(r) for r in a.miss_rates.split(",")]
    res = {"device": torch.cuda.get_device_name(), "args": vars(a), "compute_stand_in":
           "asynctls_tip_kernels sparse_attention_triton over the hot cache (+ per-layer 386 MB GEMV in attn+weights)"}
    res["pinned_h2d_memcpy_gbps"] = pinned_h2d_gbps(dev)
    print(f"pinned H2D memcpy: {res['pinned_h2d_memcpy_gbps']:.1f} GB/s", flush=True)

    t0 = time.perf_counter()
    pool = HostKVPool(a.host_layers, W, bs, H, D, dtype=torch.bfloat16, pin=True)
    for hl in range(a.host_layers):
        for kv in range(2):
            pool.data[hl, kv].copy_(torch.randn(W, H, bs, D, device=dev, dtype=torch.bfloat16))
    res["host_pool_gib"] = pool.nbytes / 2**30
    res["host_pool_setup_s"] = time.perf_counter() - t0
    cache = HotBlockCache(L, B, H, a.hot_blocks, bs, D, W, pinned_blocks=2, max_blocks_per_step=K + 2,
                          dtype=torch.bfloat16, device=dev)
    res["hot_cache_gib"] = cache.nbytes / 2**30
    host_table = torch.arange(W, dtype=torch.int32, device=dev).expand(B, W).contiguous()  # requests alias
    pf = Prefetcher(cache, pool, host_table, host_layer_of=[l % a.host_layers for l in range(L)])
    rows = torch.arange(B, device=dev)
    pinned = torch.tensor([0, W - 1], dtype=torch.int32, device=dev).view(1, 1, 2).expand(B, H, 2).contiguous()
    for l in range(L):
        pf.pin(l, rows, pinned)

    # Selections for every rate: (T, L, B, H, K) blocks, consecutive steps sharing all but ~K*r.
    T = a.warmup + a.steps
    def selections(rate):
        # A fresh permutation of the candidate blocks 1..W-2 per sequence, so one sequence's blocks
        # are not already resident from another's.
        cand = torch.rand(L, B, H, W - 2, device=dev).argsort(-1).to(torch.int32) + 1
        k = torch.floor(rate * K + torch.rand(T, L, B, H, device=dev)).long()
        off = torch.cumsum(k, 0) - k[0]
        idx = off.unsqueeze(-1) + torch.arange(K, device=dev)  # (T, L, B, H, K)
        return cand.unsqueeze(0).expand(T, -1, -1, -1, -1).gather(-1, idx)

    def positions(sel):  # (T, L, B, H, K) -> (T, L, B*H, 1, P) int32
        ar = torch.arange(bs, device=dev, dtype=torch.int32)
        fixed = torch.cat([ar, (W - 1) * bs + ar]).expand(*sel.shape[:-1], 2 * bs)
        chosen = (sel.unsqueeze(-1) * bs + ar).flatten(-2)
        return torch.cat([fixed, chosen], -1).reshape(T, L, B * H, 1, -1).contiguous()

    P = (K + 2) * bs
    hints = torch.empty(L, B, H, K, dtype=torch.int32, device=dev)
    pos = torch.empty(L, B * H, 1, P, dtype=torch.int32, device=dev)
    q = torch.randn(B * H, Hq // H, D, device=dev, dtype=torch.bfloat16)
    plan = attention_plan(B * H, Hq // H, 1, P, D, D)
    ws = AttentionWorkspace(B * H, Hq // H, plan["NUM_SPLITS"], D, dev)
    out = torch.empty(B * H, Hq // H, D, device=dev, dtype=torch.bfloat16)
    x = torch.randn(B, 4096, device=dev, dtype=torch.bfloat16)
    wmat = torch.randn(4096, 47104, device=dev, dtype=torch.bfloat16)
    y = torch.empty(B, 47104, device=dev, dtype=torch.bfloat16)
    scale = D ** -0.5

    def step(offload: bool, weights: bool):
        if offload:
            pf.begin_step(rows, hints)
        for l in range(L):
            table = pf.acquire(l) if offload else cache.block_table(l, rows)
            hk, hv = cache.layer_cache(l)
            sparse_attention_triton(q, hk, hv, table, pos[l], scale, out=out, workspace=ws)
            if weights:
                torch.mm(x, wmat, out=y)
        if offload:
            pf.end_step()

    def copy_only():
        pf.begin_step(rows, hints)
        for l in range(L):
            pf.prefetch(l)
        pf.end_step()

    sel0 = selections(0.0)
    pos0 = positions(sel0)
    hints.copy_(sel0[0]); pos.copy_(pos0[0])
    for _ in range(2):  # compile and make the rate-0 selection resident
        step(True, True)
    torch.cuda.synchronize()
    graphs = {}
    for name, fn in (("full_attn", lambda: step(True, False)), ("compute_attn", lambda: step(False, False)),
                     ("full_attn+weights", lambda: step(True, True)),
                     ("compute_attn+weights", lambda: step(False, True)), ("copy", copy_only)):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs[name] = g
    torch.cuda.synchronize()

    def timed(name, sel, pos_all):
        ev = []
        for t in range(T):
            if t == a.warmup:
                timed.counters_at_warmup = cache.counters.clone()
            hints.copy_(sel[t]); pos.copy_(pos_all[t])
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); graphs[name].replay(); e1.record()
            if t >= a.warmup:
                ev.append((e0, e1))
        torch.cuda.synchronize()
        times = sorted(x.elapsed_time(y) for x, y in ev)
        return times[len(times) // 2]  # median ms

    # Compute-only: blocks of the rate-0 selection are resident (the full graph made them so).
    timed("full_attn", sel0, pos0)
    t_compute = {"attn": timed("compute_attn", sel0, pos0), "attn+weights": timed("compute_attn+weights", sel0, pos0)}

    # Copy check: hot slots hold the host bytes of the blocks the table maps.
    table = cache.block_table(3, rows).view(B, H, W)
    hl = pf.host_layer_of[3]
    ok = True
    for b, h in ((0, 0), (B - 1, H - 1), (B // 2, 1)):
        for blk in sel0[-1, 3, b, h, :4].tolist() + [0, W - 1]:
            slot = int(table[b, h, blk])
            ok &= slot >= 0 and torch.equal(cache.key[3, slot, :, 0].cpu(), pool.data[hl, 0, blk, h])
            ok &= torch.equal(cache.value[3, slot, :, 0].cpu(), pool.data[hl, 1, blk, h])
    res["copy_check"] = bool(ok)

    rows_out = []
    block_bytes = pool.block_bytes
    for r in rates:
        sel = selections(r)
        pa = positions(sel)
        row = {"miss_rate": r}
        row["t_copy_ms"] = timed("copy", sel, pa)
        d = (cache.counters - timed.counters_at_warmup).sum(0)  # timed steps only (not the cold first step)
        row["blocks_copied_per_step"] = d[2].item() / a.steps
        row["hit_rate"] = d[1].item() / max(d[0].item(), 1)
        row["overflow"] = d[3].item()
        row["mb_copied_per_step"] = row["blocks_copied_per_step"] * block_bytes / 1e6
        row["copy_gbps"] = row["mb_copied_per_step"] / row["t_copy_ms"] if row["t_copy_ms"] else 0.0
        for mode in ("attn", "attn+weights"):
            sel_r = selections(r)  # fresh misses (the copy-only run made the previous ones resident)
            t_full = timed(f"full_{mode}", sel_r, positions(sel_r))
            row[f"t_full_ms[{mode}]"] = t_full
            row[f"t_compute_ms[{mode}]"] = t_compute[mode]
            row[f"exposed_share[{mode}]"] = max(t_full - t_compute[mode], 0.0) / t_full
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    res["rows"] = rows_out
    res["bytes_per_missed_block"] = block_bytes

    print("\n| miss rate | MB copied/step | t_copy ms | copy GB/s | attn: compute / full ms, exposed | "
          "attn+weights: compute / full ms, exposed |")
    print("|---|---|---|---|---|---|")
    for row in rows_out:
        print(f"| {row['miss_rate']:.0%} | {row['mb_copied_per_step']:.1f} | {row['t_copy_ms']:.3f} | "
              f"{row['copy_gbps']:.1f} | {row['t_compute_ms[attn]']:.3f} / {row['t_full_ms[attn]']:.3f}, "
              f"{row['exposed_share[attn]']:.1%} | {row['t_compute_ms[attn+weights]']:.3f} / "
              f"{row['t_full_ms[attn+weights]']:.3f}, {row['exposed_share[attn+weights]']:.1%} |")
    print(f"copy_check={res['copy_check']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
