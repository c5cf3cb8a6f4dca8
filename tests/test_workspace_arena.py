"""The decode workspace arena: every batch size's workspace carved from one buffer sized for the largest."""

import pytest
import torch

from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from asynctls_tip_kernels.sparse_decode import SparseDecodeWorkspace, WorkspaceArena

CONFIG = SparseAttentionConfig(token_budget=256, num_blocks=32, selection_block_size=16,
                               sink_tokens=16, local_tokens=16, index_channels=16)


def _args(batch):
    return (batch, 8, 2, 64, 64, 40, 16, CONFIG, torch.bfloat16, "cpu")


def test_workspaces_share_the_arena_and_keep_their_shapes():
    nbytes = max(WorkspaceArena.required_bytes(*_args(b)) for b in range(1, 9))
    arena = WorkspaceArena(nbytes, "cpu")
    small = SparseDecodeWorkspace(*_args(3), empty=arena.carver())
    large = SparseDecodeWorkspace(*_args(8), empty=arena.carver())
    plain = SparseDecodeWorkspace(*_args(8))
    base = arena.buffer.data_ptr()
    for ws in (small, large):
        assert ws.block_scores.data_ptr() == base  # carving starts at the arena's start
        for t in (ws.block_scores, ws.block_ids, ws.token_scores, ws.positions, ws.out,
                  ws.attention.m, ws.attention.l, ws.attention.acc):
            assert base <= t.data_ptr() < base + nbytes
            assert t.is_contiguous()
    for name in ("block_scores", "block_ids", "token_scores", "positions", "out"):
        assert getattr(large, name).shape == getattr(plain, name).shape
        assert getattr(large, name).dtype == getattr(plain, name).dtype
    assert large.attention.acc.shape == plain.attention.acc.shape
    # Buffers of one workspace never overlap.
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in (large.block_scores, large.block_ids, large.token_scores, large.positions,
                             large.out, large.attention.m, large.attention.l, large.attention.acc))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_arena_too_small_names_the_fix():
    arena = WorkspaceArena(WorkspaceArena.required_bytes(*_args(2)), "cpu")
    with pytest.raises(ValueError, match="for_largest"):
        SparseDecodeWorkspace(*_args(64), empty=arena.carver())


def test_gpu_builders_workspace_pool_is_sized_once_and_never_resized():
    """`vllm_asynctls.decode_workspaces.DecodeWorkspaces`, what both GPU builders carve from: one arena for
    every batch size up to the largest, one workspace per size, and an error (not a silent new arena that
    captured graphs would not see) if the block table's width changed."""
    from vllm_asynctls.decode_workspaces import DecodeWorkspaces

    pool = DecodeWorkspaces(lambda batch, width: (batch, 8, 2, 64, 64, width, 16, CONFIG, torch.bfloat16, "cpu"),
                            max_batch=8, device="cpu", label="")
    three = pool.get(3, 40)
    assert pool.get(3, 40) is three
    eight = pool.get(8, 40)
    base = pool._arena.buffer.data_ptr()
    assert three.block_scores.data_ptr() == eight.block_scores.data_ptr() == base  # both carved from the start
    assert pool._arena.buffer.numel() == max(WorkspaceArena.required_bytes(*_args(b)) for b in range(1, 9))
    assert eight.out.shape == SparseDecodeWorkspace(*_args(8)).out.shape
    with pytest.raises(RuntimeError, match="block table is 41 columns wide, not 40"):
        pool.get(3, 41)


def test_gpu_builders_workspace_pool_follows_an_fp8_caches_plan():
    """Under `--kv-cache-dtype fp8` the builders pass vLLM's `kv_cache_spec.dtype` (uint8): the attention's
    split count differs from a bf16 cache's at some batches (Qwen3-8B shapes, budget 2048: 5 splits at B=24,
    2 on fp8), so the pool's workspaces and its arena must be those of the fp8 plan."""
    from asynctls_tip_kernels.sparse_attention import attention_plan
    from vllm_asynctls.decode_workspaces import DecodeWorkspaces

    config = SparseAttentionConfig(selection_block_size=64, num_blocks=128, token_budget=2048)

    def args(batch, width=40):
        return (batch, 32, 8, 128, 128, width, 16, config, torch.bfloat16, "cpu")

    pools = {kv_dtype: DecodeWorkspaces(args, max_batch=24, device="cpu", label="", kv_dtype=kv_dtype)
             for kv_dtype in (torch.bfloat16, torch.uint8)}
    for kv_dtype, pool in pools.items():
        ws = pool.get(24, 40)
        splits = attention_plan(24, 32, 8, config.attended_tokens, 128, 128, kv_bytes=kv_dtype.itemsize)["NUM_SPLITS"]
        assert ws.attention.acc.shape == (24, 32, splits, 128)
        assert ws.key[-1] == (kv_dtype == torch.uint8)
        assert pool._arena.buffer.numel() == max(WorkspaceArena.required_bytes(*args(b), kv_dtype=kv_dtype)
                                                 for b in range(1, 25))
    assert pools[torch.bfloat16].get(24, 40).attention.acc.shape[2] == 5
    assert pools[torch.uint8].get(24, 40).attention.acc.shape[2] == 2
