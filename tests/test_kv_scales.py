"""`set_kv_scales`: non-unit fp8 KV-cache scales for benchmark engines (so a scale the decode path ignores shows)."""

import pytest
import torch

from vllm_asynctls.evaluation.kv_scales import set_kv_scales


class _Attention(torch.nn.Module):
    """The scale attributes vLLM's attention layers carry (`_init_kv_cache_quant`)."""

    def __init__(self):
        super().__init__()
        for n in "qkv":
            self.register_buffer(f"_{n}_scale", torch.tensor(1.0))
            setattr(self, f"_{n}_scale_float", 1.0)
        self._k_scale_cpu = torch.tensor(1.0)


def test_set_kv_scales_in_place_on_every_attention_layer():
    model = torch.nn.Sequential(_Attention(), torch.nn.Linear(4, 4), torch.nn.Sequential(_Attention()))
    buffers = [m._k_scale for m in model.modules() if isinstance(m, _Attention)]
    assert set_kv_scales(model, q=0.1, k=0.05, v=0.02) == 2
    for m in (model[0], model[2][0]):
        assert (float(m._q_scale), float(m._k_scale), float(m._v_scale)) == pytest.approx((0.1, 0.05, 0.02))
        assert (m._q_scale_float, m._k_scale_float, m._v_scale_float) == pytest.approx((0.1, 0.05, 0.02))
        assert float(m._k_scale_cpu) == pytest.approx(0.05)
    after = [m._k_scale for m in model.modules() if isinstance(m, _Attention)]
    assert all(a is b for a, b in zip(after, buffers))  # in place: captured graphs keep reading them


def test_set_kv_scales_rejects_a_non_positive_scale():
    with pytest.raises(ValueError, match="k must be > 0; got 0"):
        set_kv_scales(_Attention(), q=1.0, k=0, v=1.0)
