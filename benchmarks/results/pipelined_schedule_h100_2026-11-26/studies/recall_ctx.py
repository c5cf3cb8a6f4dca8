import sys, time
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
for L in (int(a) for a in sys.argv[1:]):
    t = time.time()
    bsd.recall_rows(L, [2048, 1024, 512], B=2, device="cpu")
    print("L", L, "took", round(time.time() - t, 1), "s", flush=True)
