"""Random weights for benchmark engines loaded with `load_format="dummy"`.

vLLM's dummy weights are uniform in +-1e-3 with the same values in every parameter of a shape (so
`q_norm` equals `k_norm`): q and k come out near 5e-6, every attention score of a row rounds to the
same float, and a sparse selection degenerates to the lowest-indexed blocks. `randomize_weights`
re-initialises a loaded model in place (addresses kept, so captured CUDA graphs and compiled code stay
valid); ship it to the workers with `LLM.apply_model(randomize_weights)` (it is importable, so vLLM
pickles it by reference; set `VLLM_ALLOW_INSECURE_SERIALIZATION=1`).
"""

from __future__ import annotations

import torch

__all__ = ["randomize_weights"]


def randomize_weights(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> int:
    """Re-initialise `model`'s parameters in place: 1-D ones (norm weights, biases) to 1 and 0 (by
    name), the rest N(0, std), drawn on the CPU from `seed` (the same values on every worker of the
    same shard). Returns the number of parameter tensors changed."""
    if std <= 0:
        raise ValueError(f"randomize_weights: std must be > 0; got {std}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
            changed += 1
    return changed
