"""Attention-mass recall of sparse selections on a real model's own queries and keys.

Design note
-----------
Accuracy says whether an answer survived; recall says how much of dense attention's softmax mass the
selected positions hold, per layer, which is the mechanism behind it. `capture_qk` runs one
transformers forward (float32) over a token sequence and records, for every attention layer, the
post-RoPE keys of every position and the post-RoPE queries of a few chosen positions (the decode
steps), through forward pre-hooks on the attention modules: the model's forward is not changed, the
hook recomputes `q_proj` / `k_proj` + RoPE from the inputs the module receives.

`selection_recall` then lays the keys out as a paged KV cache (block table = identity), builds the
reference's index exactly as the plugin does (index channels calibrated on the prompt's keys, then
`write_index`), and for each mode asks the reference (`asynctls_tip_kernels.sparse_decode_reference`,
the single source of truth) which positions one decode step attends to, and scores them with its
`attention_mass_recall`. Query position p attends to keys `[0, p]`, as the decode step that
processes the token at p does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["LayerQK", "capture_qk", "selection_recall", "decode_query_positions"]


@dataclass
class LayerQK:
    """One layer's capture. queries: (P, Hq, D) float32 at `positions`; keys: (T, Hkv, D) float32;
    positions: (P,) int64 query positions; scale: the softmax scale."""

    queries: Tensor
    keys: Tensor
    positions: Tensor
    scale: float


def decode_query_positions(prompt_len: int, total_len: int, max_steps: int = 8) -> list[int]:
    """Positions whose queries a decode step computes: the last prompt token (whose query picks the
    first answer token, here a proxy for the first decode step) and the next generated tokens."""
    last = min(total_len, prompt_len + max_steps - 1)
    return list(range(prompt_len - 1, last))


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim")]
    if not mods:
        raise ValueError(f"no attention modules with q_proj/k_proj found in {type(model).__name__}")
    return mods


@torch.no_grad()
def capture_qk(model: torch.nn.Module, input_ids: Sequence[int], query_positions: Sequence[int]) -> list[LayerQK]:
    """Queries at `query_positions` and all keys, per attention layer, from one forward (Llama-style
    attention: q_proj / k_proj, optional q_norm / k_norm, RoPE from `position_embeddings`)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = model.config
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    pos = torch.as_tensor(list(query_positions), dtype=torch.long, device=next(model.parameters()).device)
    captured: list[LayerQK] = []

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (1, T, hidden)
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]  # (1, T, D)
        D = module.head_dim
        h = hidden  # the model's dtype: projections and norms as the model runs them, RoPE in float32
        q = module.q_proj(h[:, pos]).view(1, len(pos), num_heads, D)  # (1, P, Hq, D)
        k = module.k_proj(h).view(1, h.shape[1], num_kv_heads, D)  # (1, T, Hkv, D)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.float(), k.float()
        q, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos[:, pos].float(), sin[:, pos].float())
        _, k = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos.float(), sin.float())
        captured.append(LayerQK(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), pos, module.scaling))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in _attention_modules(model)]
    try:
        device = next(model.parameters()).device
        model(torch.as_tensor([list(input_ids)], dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def selection_recall(layers: Sequence[LayerQK], configs: Iterable[Any], cache_block_size: int = 128,
                     calibration: Any = None) -> list[dict[str, float]]:
    """Attention-mass recall of each config's selection (a `SparseAttentionConfig`, any mode), averaged
    over layers, kv heads and query positions. Returns one dict per config: {"recall", "min_layer_recall",
    "attended"} where "attended" is the mean number of positions attended per kv head. `calibration`: an
    `IndexCalibration` (`vllm_asynctls.calibration`) whose channels replace the online choice, as the
    plugin's `index_calibration_file` does (layer l of `layers` is the model's decoder layer l)."""
    from asynctls_tip_kernels import sparse_decode_reference as ref

    configs = list(configs)
    sums = [[] for _ in configs]
    attended = [[] for _ in configs]
    for number, layer in enumerate(layers):
        T, Hkv, D = layer.keys.shape
        P = layer.positions.numel()
        W = -(-T // cache_block_size)
        key_cache = layer.keys.new_zeros(W * cache_block_size, Hkv, D)
        key_cache[:T] = layer.keys
        key_cache = key_cache.view(W, cache_block_size, Hkv, D)  # (W, cbs, Hkv, D), block table = identity
        block_table = torch.arange(W, dtype=torch.int32).expand(P, W).contiguous()  # (P, W)
        seq_lens = (layer.positions + 1).to(torch.int32)  # (P,): query p attends to [0, p]
        slots = torch.arange(T, dtype=torch.int64)
        for i, cfg in enumerate(configs):
            cfg.validate_for_cache(cache_block_size, D)
            index = ref.allocate_index(W, cache_block_size, Hkv, D, cfg, torch.float32, "cpu")
            if cfg.index_basis == "channels" and cfg.index_bits != 16 and calibration is not None:
                ref.set_index_channels(index, calibration.channels(number))
            elif cfg.index_bits != 16 or cfg.index_basis == "pca":
                # The plugin calibrates the index (channels or basis) on the prompt's keys: so do we.
                ref.calibrate_index(index, layer.keys, cfg)
            ref.write_index(index, layer.keys, slots, cfg)
            _, positions, _ = ref.sparse_decode(
                layer.queries, key_cache, key_cache, block_table, seq_lens, index, cfg, layer.scale
            )  # positions: (P, Hkv, attended)
            r = ref.attention_mass_recall(layer.queries, key_cache, block_table, seq_lens, positions, layer.scale)
            sums[i].append(r.mean().item())
            attended[i].append((positions >= 0).sum(-1).float().mean().item())
    return [
        {"recall": sum(s) / len(s), "min_layer_recall": min(s), "attended": sum(a) / len(a)}
        for s, a in zip(sums, attended)
    ]
