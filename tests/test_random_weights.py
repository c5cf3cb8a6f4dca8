"""`randomize_weights`: re-initialises a loaded model in place for benchmark engines with dummy weights."""

from __future__ import annotations

import pytest
import torch

from vllm_asynctls.evaluation.random_weights import randomize_weights


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(300, 64)
        self.proj = torch.nn.Linear(64, 128, bias=True)
        self.norm = torch.nn.LayerNorm(128)
        self.q_norm_weight = torch.nn.Parameter(torch.full((16,), 1e-3))


def test_randomize_weights_in_place_with_norms_at_one():
    model = _Block().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1e-3, 1e-3)  # vLLM's dummy weights
    addresses = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert randomize_weights(model, std=0.02, seed=3) == len(addresses)
    params = dict(model.named_parameters())
    assert {n: p.data_ptr() for n, p in params.items()} == addresses  # captured graphs stay valid
    assert torch.equal(params["norm.weight"], torch.ones_like(params["norm.weight"]))
    assert torch.equal(params["q_norm_weight"], torch.ones_like(params["q_norm_weight"]))
    assert torch.equal(params["norm.bias"], torch.zeros_like(params["norm.bias"]))
    assert torch.equal(params["proj.bias"], torch.zeros_like(params["proj.bias"]))
    for name in ("embed.weight", "proj.weight"):
        w = params[name].detach().float()
        assert w.dtype == torch.float32 and params[name].dtype == torch.bfloat16
        assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    # Same seed, same values; another seed, others.
    again = _Block().to(torch.bfloat16)
    randomize_weights(again, std=0.02, seed=3)
    assert torch.equal(again.proj.weight, model.proj.weight)
    randomize_weights(again, std=0.02, seed=4)
    assert not torch.equal(again.proj.weight, model.proj.weight)


def test_randomize_weights_rejects_a_non_positive_std():
    with pytest.raises(ValueError, match="std must be > 0; got 0"):
        randomize_weights(_Block(), std=0.0)
