"""Non-unit fp8 KV-cache scales for benchmark engines.

A model without a checkpoint KV scheme serves `--kv-cache-dtype fp8` with every attention layer's query,
key and value scale at 1.0, so a decode path that ignored a scale, or applied one twice, would go
unnoticed. `set_kv_scales` gives every attention layer of a loaded model other per-tensor scales, in
place (the device tensors vLLM's kernels read, and their float copies), before the first prompt: ship
it to the workers with `LLM.apply_model(functools.partial(set_kv_scales, q=..., k=..., v=...))` (it is
importable, so vLLM pickles it by reference; set `VLLM_ALLOW_INSECURE_SERIALIZATION=1`).
"""

from __future__ import annotations

import torch

__all__ = ["set_kv_scales"]


def set_kv_scales(model: torch.nn.Module, q: float, k: float, v: float) -> int:
    """Set the per-tensor `_q_scale`, `_k_scale`, `_v_scale` (and their `_*_float` / `_*_cpu` copies) of
    every module that has them to `q`, `k`, `v`. Returns the number of layers changed."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        if not value > 0:
            raise ValueError(f"set_kv_scales: {name} must be > 0; got {value}")
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if not all(isinstance(getattr(module, f"_{n}_scale", None), torch.Tensor) for n in "qkv"):
                continue
            for n, value in (("q", q), ("k", k), ("v", v)):
                getattr(module, f"_{n}_scale").fill_(value)
                if hasattr(module, f"_{n}_scale_float"):
                    setattr(module, f"_{n}_scale_float", float(value))
                cpu = getattr(module, f"_{n}_scale_cpu", None)
                if isinstance(cpu, torch.Tensor):
                    cpu.fill_(value)
            changed += 1
    return changed
