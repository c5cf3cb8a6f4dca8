"""The attention plan from the decode batch (as shipped) against the plan of the next power of two, the
optional A/B the twenty-first session left: with the bucketed plan, every batch up to a power of two shares
that power's split count, so the attention warm-up (`warm_decode_attention`) could shrink to the
power-of-two plans. Qwen3-8B shapes, bf16, the plugin's defaults (512 blocks of 16, budget 2048, standard
step), whole step per layer with 2 layers in one CUDA graph, batches that vLLM's mixed prefill/decode steps
(any count) or its capture sizes (24, 40, 48) give, at 32K and 64K; the two plans interleaved twice, their
outputs compared. Writes $OUT/plan_bucket_ab.json."""
import json, math, os, sys
import torch
import triton
sys.path.insert(0, "benchmarks")
import bench_sparse_decode as bsd
from asynctls_tip_kernels import sparse_decode as sd, sparse_attention as sa
from asynctls_tip_kernels.sparse_config import SparseAttentionConfig

OUT = os.environ.get("OUT", "/tmp")
Hq, Hkv, D = 32, 8, 128
SCALE = 1 / math.sqrt(D)
shipped = sa.attention_plan


def bucketed(batch, *args, **kwargs):
    return shipped(triton.next_power_of_2(batch), *args, **kwargs)


def use(plan_fn):
    sa.attention_plan = sd.attention_plan = plan_fn


cfg = SparseAttentionConfig(selection_block_size=16, num_blocks=512, token_budget=2048)
res = []
for L in (32768, 65536):
    for B in (3, 5, 6, 12, 24, 40, 48):
        stack = [bsd.paged_case(B, L, Hq, Hkv, D, D, cfg, seed=B * 7 + L + i) for i in range(2)]
        outs = {}
        for rep in range(2):
            for name, fn in (("shipped", shipped), ("bucketed", bucketed)):
                use(fn)
                plan = fn(B, Hq, Hkv, cfg.attended_tokens, D, D)
                ws = sd.SparseDecodeWorkspace(B, Hq, Hkv, D, D, stack[0][3].shape[1], bsd.CACHE_BLOCK, cfg,
                                              torch.bfloat16, "cuda")
                outs[name] = [t.clone() for t in sd.sparse_decode_triton(*stack[0], cfg, SCALE, workspace=ws)[:2]]
                us = bsd.stacked_time_ms([lambda s=s, ws=ws: sd.sparse_decode_triton(*s, cfg, SCALE, workspace=ws)
                                          for s in stack]) * 1e3
                row = dict(L=L, B=B, plan=name, splits=plan["NUM_SPLITS"], split_len=plan["SPLIT_LEN"],
                           stages=plan["num_stages"], rep=rep, per_layer_us=round(us, 2))
                res.append(row); print(row, flush=True)
        use(shipped)
        eq = dict(L=L, B=B, positions_equal=bool(torch.equal(outs["shipped"][1], outs["bucketed"][1])),
                  out_max_abs_diff=float((outs["shipped"][0].float() - outs["bucketed"][0].float()).abs().max()))
        res.append(eq); print(eq, flush=True)
        del stack, ws; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "plan_bucket_ab.json"), "w"), indent=1)
