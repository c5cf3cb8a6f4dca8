import glob, math
import numpy as np, torch

def keys_of(x):
    b = x.view(np.int32)
    return np.where(b < 0, b ^ 0x7FFFFFFF, b).astype(np.int64)

def key_to_float(k):
    k32 = np.int64(k).astype(np.int32) if np.isscalar(k) else k.astype(np.int32)
    return np.array(k32 ^ ((k32 >> 31) & 0x7FFFFFFF), dtype=np.int32).view(np.float32)

def float_to_key(x):
    b = np.array(x, dtype=np.float32).view(np.int32)
    return int(np.int64(b ^ ((b >> 31) & 0x7FFFFFFF)))

def upper_q(p):
    q = min(p, 1 - p); t = math.sqrt(-2 * math.log(q))
    z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t ** 3)
    return z if p < 0.5 else -z

def shipped(x, K, INTERP=24):
    valid = np.isfinite(x)
    key = keys_of(x)[valid]; xv = x[valid].astype(np.float64)
    n = key.size
    if n <= K: return 0
    lo, hi = int(key.min()), int(key.max()) + 1
    cnt_lo, cnt_hi = n, 0
    mean, sd = xv.mean(), xv.std()
    z = upper_q(min(max(K / n, 1e-6), 1 - 1e-6))
    dens = n * math.exp(-0.5 * z * z) * 0.3989422804014327 / max(sd, 1e-30)
    last = mean + z * sd; cnt = K
    lo_m = hi_m = False; it = 0
    while True:
        lo_f, hi_f = float(key_to_float(lo)), float(key_to_float(hi - 1))
        frac = min(max((cnt_lo - K) / (cnt_lo - cnt_hi), 1 / 64), 63 / 64)
        lin = float_to_key(lo_f + (hi_f - lo_f) * frac)
        guess = lin if (lo_m and hi_m) else float_to_key(last + (cnt - K) / dens)
        mid = lin if (guess <= lo or guess >= hi) else guess
        if it >= INTERP or mid <= lo or mid >= hi: mid = (lo + hi) >> 1
        ge = key >= mid; cnt = int(ge.sum())
        last = float(key_to_float(mid))
        if cnt >= K:
            lo = int(key[ge].min()); cnt_lo = cnt; lo_m = True
        else:
            hi = int(key[~ge].max()) + 1; cnt_hi = cnt; hi_m = True
        it += 1
        if not (hi - lo > 1 and cnt_lo != K): return it

rows = []
for f in sorted(glob.glob("/tmp/rows/*.pt")):
    for k, v in torch.load(f).items():
        rows.append((k, v.numpy()))
for K in (2048, 1024, 512):
    for name, fn in (("shipped", shipped),):
        for k, r in rows:
            p = [fn(r[i], K) for i in range(r.shape[0])]
            print(K, name, k, "mean %.2f max %d" % (np.mean(p), max(p)))

def trace(x, K):
    valid = np.isfinite(x); key = keys_of(x)[valid]; xv = x[valid].astype(np.float64); n = key.size
    lo, hi = int(key.min()), int(key.max()) + 1; cnt_lo, cnt_hi = n, 0
    mean, sd = xv.mean(), xv.std(); z = upper_q(K / n)
    dens = n * math.exp(-0.5 * z * z) * 0.3989422804014327 / sd
    last = mean + z * sd; cnt = K; lo_m = hi_m = False; it = 0; out = []
    while True:
        lo_f, hi_f = float(key_to_float(lo)), float(key_to_float(hi - 1))
        frac = min(max((cnt_lo - K) / (cnt_lo - cnt_hi), 1 / 64), 63 / 64)
        lin = float_to_key(lo_f + (hi_f - lo_f) * frac)
        guess = lin if (lo_m and hi_m) else float_to_key(last + (cnt - K) / dens)
        mid = lin if (guess <= lo or guess >= hi) else guess
        ge = key >= mid; cnt = int(ge.sum()); last = float(key_to_float(mid))
        out.append(cnt)
        if cnt >= K: lo = int(key[ge].min()); cnt_lo = cnt; lo_m = True
        else: hi = int(key[~ge].max()) + 1; cnt_hi = cnt; hi_m = True
        it += 1
        if not (hi - lo > 1 and cnt_lo != K): return out, n, (mean, sd, xv.min(), xv.max())
import sys
if len(sys.argv) > 1:
    for k, r in rows:
        for i in range(r.shape[0]):
            t, n, st = trace(r[i], 2048)
            if len(t) >= 7: print(k, i, n, t, ["%.4g" % v for v in st])
