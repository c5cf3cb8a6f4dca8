"""The GPU operator: one AsyncTLS sparse decode step through the Triton kernels.

`sparse_decode_triton` has the signature and returns of the reference's `sparse_decode`
(`sparse_decode_reference.py`, the truth), for every mode. Launches per step in "asynctls" mode:
block scores, block top-k, token scores, token top-k (which also lays out the sink and local slots of
the attended positions), attention split, attention merge: six kernels, every shape fixed by the
tensor shapes and the config, no `.item()`, no host synchronisation, no branch on device values.

Lagged selection (`config.lagged_selection` with `previous_block_ids`) pipelines the step, as the paper
does: the token stage and the attention run on the previous step's blocks, so this step's block stage
(needed only by the next step) runs on a stream of its own once the token scores are written, beside
the token top-k and the attention on a higher-priority stream, both forked from and joined to the
caller's stream; the token scorer then writes the token stage's index query itself, which the block
scorer writes otherwise. H100, B=8, budget 2048, per layer with 4 layers in one graph (PDL on): the
standard step 72.0 us, the pipelined one 57.7 at 64K; 81.8 and 67.7 at 128K (`benchmarks/RESULTS.md`).

For CUDA graphs, build a `SparseDecodeWorkspace` once per (batch, shapes, config, cache dtype: an fp8 cache
takes `kv_dtype=`) and pass it: every intermediate and the outputs then live in its buffers (the returned
tensors are views of them, valid until the next call with the same workspace), so a captured step replays
with no allocation.

Bytes per step and kv head (Qwen3-8B shapes, 64K context, block 64, 128 blocks, budget 2048, 4-bit
32-channel index): int8 summaries 1024 blocks x (2 x 128 + 4) B = 260 KiB; index 8192 x (16 + 4) B =
160 KiB; K and V of 2176 attended rows 1088 KiB; about 1.5 MiB against 32 MiB for dense.
"""

from __future__ import annotations

import torch

from .block_select import block_scores_triton, topk_rows
from .index_basis import rotate_query_triton
from . import sparse_decode_reference as _reference
from .sparse_attention import (
    FP8_CACHE_DTYPES, AttentionWorkspace, attention_plan, check_kv_scales, pdl_scope, sparse_attention_triton,
    zero_rows_like,
)
from .sparse_config import SparseAttentionConfig
from .token_select import index_query_triton, token_scores_triton, word_score_heads

_PIPELINE_STREAMS: dict[int, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}

# Programmatic dependent launch per schedule. Each kernel lets the next one launch once its main loop
# is done (`sparse_attention.PDL_TRIGGER = "end"`). H100, B=8, budget 2048, per layer with 4 layers in
# one graph, PDL off -> on (`benchmarks/RESULTS.md`, 2026-11-26): standard step 77.6 -> 74.0 us at 64K,
# 87.1 -> 83.7 at 128K; pipelined step 66.6 -> 62.6 at 64K, 73.2 -> 71.9 at 128K (with the early gather
# below). Letting it launch at the start instead (the earlier trigger) made both steps slower than PDL
# off (83.0 and 71.9 us at 64K).
PDL_STANDARD_STEP = True
PDL_PIPELINED_STEP = True
# Pipelined step: the token scorer writes the index query itself (each program its row's), so the token
# stream starts with the scorer (no index-query launch on the critical path). H100, B=8, budget 2048, per
# layer with 4 layers in one graph: 62.3 -> 59.6 us at 64K, 71.9 -> 69.5 at 128K (`benchmarks/RESULTS.md`).
PIPELINED_SCORER_WRITES_INDEX_QUERY = True
# Pipelined step with the index-query launch (the flag above off): the token scorer gathers the previous
# step's block ids and the block table before it waits for the index-query launch just before it.
PIPELINED_EARLY_GATHER = True


def _pipeline_streams(device) -> tuple[torch.cuda.Stream, torch.cuda.Stream] | None:
    """(block stream, token stream) of pipelined lagged selection on `device`, made once per CUDA device:
    the block stage at the default priority, the token stage and attention (the step's critical path)
    at the highest, so that the scheduler hands them free SMs first. None off CUDA (the Triton
    interpreter runs the stages in order)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PIPELINE_STREAMS:
        _PIPELINE_STREAMS[index] = (torch.cuda.Stream(index, priority=0), torch.cuda.Stream(index, priority=-100))
    return _PIPELINE_STREAMS[index]


class WorkspaceArena:
    """One preallocated byte buffer that workspaces of different batch sizes carve their buffers from.

    A server captures one CUDA graph per batch size; their steps never run at the same time, so their
    workspaces can share memory: the arena costs the largest workspace, not the sum over batch sizes.
    Build it with `WorkspaceArena.for_largest(...)` (the arguments of the `SparseDecodeWorkspace` needing the
    most bytes: the largest of `required_bytes` over the batch sizes, not always the largest batch's, since
    the attention's split count follows the batch).
    """

    ALIGN = 256

    def __init__(self, nbytes: int, device) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)

    @staticmethod
    def _aligned(nbytes: int) -> int:
        return -(-nbytes // WorkspaceArena.ALIGN) * WorkspaceArena.ALIGN

    @classmethod
    def required_bytes(cls, *workspace_args, **workspace_kwargs) -> int:
        """Bytes a `SparseDecodeWorkspace(*workspace_args, **workspace_kwargs)` takes from an arena."""
        total = 0

        def count(shape, dtype):
            nonlocal total
            t = torch.empty(shape, dtype=dtype, device="meta")
            total += cls._aligned(t.numel() * t.element_size())
            return t

        SparseDecodeWorkspace(*workspace_args, empty=count, **workspace_kwargs)
        return total

    @classmethod
    def for_largest(cls, *workspace_args, **workspace_kwargs) -> "WorkspaceArena":
        *_, device = workspace_args
        return cls(cls.required_bytes(*workspace_args, **workspace_kwargs), device)

    def carver(self):
        """A fresh `empty(shape, dtype)` handing out consecutive aligned views of the buffer."""
        offset = 0

        def empty(shape, dtype):
            nonlocal offset
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype, device="meta").element_size()
            if offset + nbytes > self.buffer.numel():
                raise ValueError(f"WorkspaceArena of {self.buffer.numel()} bytes is too small for this workspace; "
                                 "size it with WorkspaceArena.for_largest(...) of the workspace needing the most bytes "
                                 "(the largest required_bytes over the batch sizes)")
            t = self.buffer[offset:offset + nbytes].view(dtype).view(shape)
            offset += self._aligned(nbytes)
            return t

        return empty


# The KV cache dtypes a workspace can be built for: unquantised, fp8, and the uint8 storage vLLM gives fp8 caches.
WORKSPACE_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, *FP8_CACHE_DTYPES, torch.uint8)
_WORKSPACE_KEY_FIELDS = ("batch", "num_q_heads", "num_kv_heads", "head_dim_k", "head_dim_v", "max_blocks_per_seq",
                         "cache_block_size", "config", "dtype", "fp8 cache")


class SparseDecodeWorkspace:
    """Every buffer of one decode step for fixed shapes (CUDA-graph capture needs stable addresses).

    batch, num_q_heads, num_kv_heads, head_dim_k, head_dim_v: the query / cache shapes;
    max_blocks_per_seq: block_table width W; cache_block_size: tokens per cache block.
    empty(shape, dtype): where the buffers come from (default: fresh allocations; `WorkspaceArena.carver()`
    shares one arena between the workspaces of several batch sizes). kv_dtype: the KV cache's dtype (vLLM's
    `kv_cache_spec.dtype`), one of `WORKSPACE_KV_DTYPES`; an fp8 cache (e4m3 / e5m2, or vLLM's uint8 storage
    of them) takes another attention split count, so its workspace needs it. None: `dtype`'s (unquantised).
    """

    def __init__(self, batch: int, num_q_heads: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int,
                 max_blocks_per_seq: int, cache_block_size: int, config: SparseAttentionConfig,
                 dtype: torch.dtype, device, empty=None, *, kv_dtype: torch.dtype | None = None) -> None:
        if config.mode != "asynctls":
            raise NotImplementedError(
                f"SparseDecodeWorkspace serves mode 'asynctls'; got mode={config.mode!r} (the 'block_only', "
                "'exact_topk' and 'dense' baselines are for evaluation: run them without a workspace)"
            )
        if kv_dtype is not None and kv_dtype not in WORKSPACE_KV_DTYPES:
            raise ValueError(f"SparseDecodeWorkspace: kv_dtype must be None or one of "
                             f"{[str(d) for d in WORKSPACE_KV_DTYPES]} (the KV cache's dtype); got {kv_dtype!r}")
        kv_bytes = (kv_dtype or dtype).itemsize
        self.key = (batch, num_q_heads, num_kv_heads, head_dim_k, head_dim_v, max_blocks_per_seq,
                    cache_block_size, config, dtype, kv_bytes == 1)
        S = config.selection_block_size
        self.num_selection_blocks = max_blocks_per_seq * cache_block_size // S
        f32, i32 = torch.float32, torch.int32
        empty = empty or (lambda shape, dt: torch.empty(shape, dtype=dt, device=device))
        self.block_scores = empty((batch, num_kv_heads, self.num_selection_blocks), f32)
        self.block_ids = empty((batch, num_kv_heads, config.num_blocks), i32)
        # Lagged selection reads the previous step's block ids while this step's are written: a second
        # buffer, used whenever `previous_block_ids` is `block_ids` itself (the outputs then alternate).
        self.spare_block_ids = empty((batch, num_kv_heads, config.num_blocks), i32) if config.lagged_selection else None
        self.streams = _pipeline_streams(device) if config.lagged_selection else None
        # Pipelined step: recorded on the token stream after the token scores; the block stage waits on it.
        self.token_scores_written = torch.cuda.Event() if self.streams is not None else None
        # `defer_block_join`: each deferred call records its block stage's end in the event the pending
        # (previous) call does not hold, then joins the previous call's.
        self._block_stage_done = (torch.cuda.Event(), torch.cuda.Event()) if self.streams is not None else None
        self._pending_block_stage = None  # (event, recorded while a CUDA graph was being captured)
        self.device = torch.device(device)
        self.token_scores = empty((batch, num_kv_heads, config.num_blocks * S), f32)
        self.positions = empty((batch, num_kv_heads, config.attended_tokens), i32)
        heads = word_score_heads(config, num_q_heads // num_kv_heads)
        self.index_query = None if heads is None else empty((batch, num_kv_heads, config.index_channels, heads), f32)
        plan = attention_plan(batch, num_q_heads, num_kv_heads, config.attended_tokens, head_dim_k, head_dim_v,
                              query_bytes=dtype.itemsize, kv_bytes=kv_bytes)
        self.attention = AttentionWorkspace(batch, num_q_heads, plan["NUM_SPLITS"], head_dim_v, device, empty=empty)
        self.out = empty((batch, num_q_heads, head_dim_v), dtype)

    def join_block_stage(self) -> None:
        """Make the current stream wait for the block stage a `defer_block_join` call left running (no-op
        when none is pending). Call it after a model's last layer, before the block ids of that call are
        read, before a CUDA-graph capture ends, and before another workspace carved from the same
        `WorkspaceArena` is used."""
        if self._pending_block_stage is None:
            return
        event, captured = self._pending_block_stage
        if captured != torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "asynctls: a deferred block stage recorded "
                f"{'inside' if captured else 'outside'} a CUDA-graph capture is still pending "
                f"{'outside' if captured else 'inside'} one; call workspace.join_block_stage() before the "
                "capture ends (or before it begins)")
        torch.cuda.current_stream(self.device).wait_event(event)
        self._pending_block_stage = None


def _check_inputs(query, key_cache, value_cache, block_table, seq_lens, index, config, kv_scales):
    if not isinstance(config, SparseAttentionConfig):
        raise ValueError(f"config must be a SparseAttentionConfig; got {type(config).__name__}")
    check_kv_scales("sparse_decode", key_cache, kv_scales)
    if key_cache.dtype in FP8_CACHE_DTYPES and (config.index_bits == 16 or config.mode == "exact_topk"):
        raise ValueError(
            f"sparse_decode: an fp8 KV cache is read by the attention only; token scores from the full keys "
            f"(index_bits=16, mode 'exact_topk') need a bf16/fp16/fp32 cache; got index_bits={config.index_bits}, "
            f"mode={config.mode!r} with a {key_cache.dtype} cache (use index_bits 4 or 8)")
    if query.dim() != 3 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError(f"query must be (B, Hq, Dk) and caches 4-D; got {tuple(query.shape)}, "
                         f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_table and seq_lens must be int32; got {block_table.dtype}, {seq_lens.dtype}")
    if block_table.shape[0] != query.shape[0] or seq_lens.shape != (query.shape[0],):
        raise ValueError(f"block_table {tuple(block_table.shape)} / seq_lens {tuple(seq_lens.shape)} do not match "
                         f"batch {query.shape[0]}")
    config.validate_for_cache(key_cache.shape[1], key_cache.shape[3])
    if config.mode in ("asynctls", "block_only"):
        if index.block_min.shape[1] * config.selection_block_size != key_cache.shape[1]:
            raise ValueError(f"index summaries {tuple(index.block_min.shape)} do not tile cache blocks of "
                             f"{key_cache.shape[1]} tokens at selection_block_size={config.selection_block_size}")
        # The summaries' dtypes and shapes are checked by `block_scores_triton`.


def sparse_decode_triton(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, index, config: SparseAttentionConfig, scale: float,
    previous_block_ids: torch.Tensor | None = None, workspace: SparseDecodeWorkspace | None = None,
    block_ids_out: torch.Tensor | None = None, defer_block_join: bool = False,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step on the GPU -> (out (B, Hq, Dv), positions, block_ids (B, Hkv, num_blocks)).

    Same contract as the reference's `sparse_decode`. With `workspace` (mode "asynctls") nothing is
    allocated and the returns are views of the workspace's buffers, except block ids written into
    `block_ids_out` when given, and, with an index basis (`index_basis="pca"`), the rotated query (one
    small tensor per call; from the graph's pool when captured).

    defer_block_join (the pipelined step: lagged selection with `previous_block_ids` and a workspace on
    a CUDA device): this call's block stage, whose ids only the next decode step reads, is joined into
    the caller's stream by the next such call with the same workspace (one model layer later) instead of
    before this call returns, so it also runs beside that call's token stage and attention. Until then
    `query` and `index` must not be written in place and the returned block ids (`block_ids_out`,
    required: the workspace's buffer is the next call's) not read; `workspace.join_block_stage()` joins
    the last call. The block stage's inputs (`query`, `block_table`, `seq_lens`) are marked in use by its
    stream (`record_stream`), so the caching allocator does not hand their memory out before it ends.

    kv_scales: for an fp8 cache (vLLM's `--kv-cache-dtype fp8`: stored = value / scale), (k_scale, v_scale),
    one-element float32 tensors on the device (vLLM's `layer._k_scale`, `layer._v_scale`); only the
    attention reads K/V (the index is written from the unquantised keys), so the result is the
    reference's over the dequantised caches.
    """
    _check_inputs(query, key_cache, value_cache, block_table, seq_lens, index, config, kv_scales)
    B, Hq, Dk = query.shape
    Hkv, Dv = key_cache.shape[2], value_cache.shape[3]
    S = config.selection_block_size
    cbs = key_cache.shape[1]
    W = block_table.shape[1]
    n_sel = W * cbs // S
    device = query.device
    if workspace is not None and config.mode != "asynctls":
        raise NotImplementedError(f"a workspace serves mode 'asynctls' only; got mode={config.mode!r}")
    call_key = (B, Hq, Hkv, Dk, Dv, W, cbs, config, query.dtype, key_cache.element_size() == 1)
    if workspace is not None and workspace.key != call_key:
        differ = [f"{name}: workspace {built!r}, call {called!r}" for name, built, called
                  in zip(_WORKSPACE_KEY_FIELDS, workspace.key, call_key) if built != called]
        hint = (f" (build it with kv_dtype={key_cache.dtype})" if call_key[-1] != workspace.key[-1] else "")
        raise ValueError(f"sparse_decode_triton: the workspace was built for another call; {'; '.join(differ)}{hint}")
    ws = workspace

    if config.mode == "dense":
        T = W * cbs
        all_positions = torch.arange(T, device=device, dtype=torch.int32).expand(B, Hkv, T)
        positions = torch.where(all_positions < seq_lens.view(B, 1, 1), all_positions, -1).to(torch.int32).contiguous()
        out = sparse_attention_triton(query, key_cache, value_cache, block_table, positions, scale,
                                      kv_scales=kv_scales)
        no_blocks = torch.full((B, Hkv, config.num_blocks), -1, dtype=torch.int32, device=device)
        return out, positions, no_blocks

    if config.mode == "exact_topk":
        # The oracle: exact scores (index_bits=16) for every addressable position, one top-k.
        every_block = torch.arange(n_sel, device=device, dtype=torch.int32).expand(B, Hkv, n_sel).contiguous()
        exact = config.with_(index_bits=16, num_blocks=max(n_sel, 1), token_budget=min(config.token_budget, n_sel * S))
        scores = token_scores_triton(query, index, key_cache, block_table, seq_lens, every_block, exact,
                                     softmax_scale=scale)
        positions = topk_rows(scores.view(B * Hkv, n_sel * S), config.token_budget, seq_lens=seq_lens,
                              sink_tokens=config.sink_tokens, local_tokens=config.local_tokens,
                              rows_per_seq=Hkv).view(B, Hkv, config.attended_tokens)
        out = sparse_attention_triton(query, key_cache, value_cache, block_table, positions, scale,
                                      kv_scales=kv_scales)
        no_blocks = torch.full((B, Hkv, config.num_blocks), -1, dtype=torch.int32, device=device)
        return out, positions, no_blocks

    lagged = config.mode == "asynctls" and config.lagged_selection and previous_block_ids is not None
    if lagged and (previous_block_ids.shape != (B, Hkv, config.num_blocks) or previous_block_ids.dtype != torch.int32):
        raise ValueError(f"previous_block_ids must be int32 {(B, Hkv, config.num_blocks)}; got "
                         f"{previous_block_ids.dtype} {tuple(previous_block_ids.shape)}")
    # The block scorer also writes the token stage's query when the token scores take the word path
    # (the workspace holds its buffer exactly then), except when it runs on its own stream (pipelined).
    if ws is not None:
        index_query = ws.index_query
    else:
        heads = word_score_heads(config, Hq // Hkv) if config.mode == "asynctls" else None
        index_query = None if heads is None else torch.empty(
            B, Hkv, config.index_channels, heads, dtype=torch.float32, device=device)
    if config.mode == "block_only":
        # Quest at the same token budget (an evaluation baseline, not the hot path): the top
        # token_budget // S blocks by the same kernels, then the reference's own layout of their
        # candidates (fixed-size torch ops, no sync).
        block_scores = block_scores_triton(query, index, block_table, seq_lens, config, n_sel, softmax_scale=scale)
        kept = config.token_budget // S
        kept_ids = topk_rows(block_scores.view(B * Hkv, n_sel), kept).view(B, Hkv, kept)
        pos = (kept_ids.long().unsqueeze(-1) * S + torch.arange(S, device=device)).view(B, Hkv, kept * S)
        real = (kept_ids >= 0).unsqueeze(-1).expand(-1, -1, -1, S).reshape(B, Hkv, kept * S)
        end = (seq_lens.long() - config.local_tokens).view(B, 1, 1)
        candidate = real & (pos >= config.sink_tokens) & (pos < end)
        selected = torch.full((B, Hkv, config.token_budget), -1, dtype=torch.int32, device=device)
        selected[..., :kept * S] = torch.where(candidate, pos, -1)
        positions = _reference.attended_positions(selected, seq_lens, config).contiguous()
        block_ids = torch.full((B, Hkv, config.num_blocks), -1, dtype=torch.int32, device=device)
        block_ids[..., :kept] = kept_ids
        out = sparse_attention_triton(query, key_cache, value_cache, block_table, positions, scale,
                                      kv_scales=kv_scales)
        return out, positions, block_ids

    # "asynctls"
    streams = ws.streams if lagged and ws is not None else None
    if block_ids_out is not None and (block_ids_out.shape != (B, Hkv, config.num_blocks)
                                      or block_ids_out.dtype != torch.int32 or not block_ids_out.is_contiguous()):
        raise ValueError(f"block_ids_out must be contiguous int32 {(B, Hkv, config.num_blocks)}; got "
                         f"{block_ids_out.dtype} {tuple(block_ids_out.shape)} with strides "
                         f"{tuple(block_ids_out.stride())}")
    if block_ids_out is not None and lagged and _overlaps(previous_block_ids, block_ids_out):
        raise ValueError(f"block_ids_out must not overlap previous_block_ids (this step reads them while it "
                         f"writes); got buffers at {block_ids_out.data_ptr():#x} and "
                         f"{previous_block_ids.data_ptr():#x}")
    if defer_block_join and streams is None:
        raise ValueError(
            "defer_block_join=True needs the pipelined step: mode 'asynctls' with lagged_selection, "
            "previous_block_ids and a workspace on a CUDA device; got "
            f"mode={config.mode!r}, lagged_selection={config.lagged_selection}, "
            f"previous_block_ids={'given' if previous_block_ids is not None else None}, "
            f"workspace={'given' if ws is not None else None}, device={device}")
    if defer_block_join and block_ids_out is None:
        raise ValueError("defer_block_join=True needs block_ids_out: the workspace's block-id buffer is "
                         "rewritten by the next call before this call's ids are joined; got block_ids_out=None")
    if streams is None:
        if ws is not None:
            ws.join_block_stage()  # a deferred block stage still uses the workspace's block buffers
        with _step_pdl(pipelined=False):
            q_index, q_tokens = _index_queries(query, index, config)
            block_ids = _select_blocks(q_index, index, block_table, seq_lens, config, n_sel, scale, ws, index_query,
                                       previous_block_ids if lagged else None, block_ids_out)
            out, positions = _token_stage_and_attention(query, key_cache, value_cache, block_table, seq_lens, index,
                                                        config, scale, ws, index_query,
                                                        previous_block_ids.contiguous() if lagged else block_ids,
                                                        q_tokens, kv_scales=kv_scales)
        return out, positions, block_ids
    # The paper's pipelining: this step's block stage (whose ids only the next step reads) runs on its
    # own stream beside the token stage and the attention over the previous step's blocks, which run on
    # a higher-priority stream. The block stage starts once the token scores are written: it then
    # shares the chip with the token top-k (64 latency-bound programs) and the attention instead of
    # competing with the token scorer for bandwidth (H100, B=8, 64K, budget 2048: 66.7 vs 70.8 us per
    # layer). Both streams fork from and join the caller's stream (CUDA-graph capturable).
    block_stream, token_stream = streams
    main = torch.cuda.current_stream(device)
    token_stream.wait_stream(main)
    with _step_pdl(pipelined=True), torch.cuda.stream(token_stream):
        # On the token stream, so the token scorer follows the rotation by programmatic dependent launch;
        # the block stage waits for the token scores, hence for it too.
        q_index, q_tokens = _index_queries(query, index, config)
        token_blocks = previous_block_ids.contiguous()  # any copy before the index-query launch (see below)
        inline = index_query is not None and PIPELINED_SCORER_WRITES_INDEX_QUERY
        if index_query is not None and not inline:
            index_query_triton(q_tokens, index.channel_ids, config.index_bits, index_query)
        # With the index-query launch right before it, the token scorer may gather the block ids and the
        # block table before its PDL wait: they were written before that launch.
        out, positions = _token_stage_and_attention(query, key_cache, value_cache, block_table, seq_lens, index,
                                                    config, scale, ws, index_query, token_blocks, q_tokens,
                                                    scores_written=ws.token_scores_written,
                                                    ids_ready=index_query is not None and not inline
                                                    and PIPELINED_EARLY_GATHER, write_index_query=inline,
                                                    kv_scales=kv_scales)
    block_stream.wait_stream(main)  # implied by the event below (the token stream waited for main); kept explicit
    block_stream.wait_event(ws.token_scores_written)
    with _step_pdl(pipelined=True), torch.cuda.stream(block_stream):
        block_ids = _select_blocks(q_index, index, block_table, seq_lens, config, n_sel, scale, ws, None,
                                   previous_block_ids, block_ids_out)
        if defer_block_join:
            pending = ws._pending_block_stage
            first, second = ws._block_stage_done
            done = second if pending is not None and pending[0] is first else first
            done.record()
            for t in {id(t): t for t in (query, q_index, block_table, seq_lens)}.values():
                t.record_stream(block_stream)
    main.wait_stream(token_stream)
    if not defer_block_join:
        ws.join_block_stage()  # checks the capture state; the wait below covers it anyway (one stream)
        main.wait_stream(block_stream)
        return out, positions, block_ids
    # Join the previous deferred call's block stage (H100, B=8, budget 2048, 4 layers in one graph:
    # 128K 72.3 -> 68.2 us per layer, 64K 62.0 -> 61.4).
    ws.join_block_stage()
    ws._pending_block_stage = (done, torch.cuda.is_current_stream_capturing())
    return out, positions, block_ids


def _step_pdl(pipelined: bool):
    """The PDL scope of a decode step's launches: the pipelined step's or the standard step's."""
    return pdl_scope(PDL_PIPELINED_STEP if pipelined else PDL_STANDARD_STEP)


def _first_batch_of_each_plan(max_batch: int, *plan_args, **plan_kwargs) -> list[int]:
    """The smallest batch of each distinct `attention_plan(batch, ...)` over batches 1..max_batch."""
    first: dict[tuple, int] = {}
    for batch in range(1, max_batch + 1):
        first.setdefault(tuple(sorted(attention_plan(batch, *plan_args, **plan_kwargs).items())), batch)
    return sorted(first.values())


def warm_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_table: torch.Tensor, config: SparseAttentionConfig, scale: float, max_batch: int,
                          kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[int]:
    """Compile every launch variant the decode step's attention can take for batches of 1 to `max_batch` rows,
    with inputs laid out like these (a decode call's own): one all-padded attention launch per distinct
    `attention_plan` (its split count follows the batch), at the smallest batch that takes it. Returns those
    batch sizes.

    A CUDA graph compiles only its own batch sizes' variants. A step that mixes prefill and decode runs the
    attention outside any graph, at whatever number of decode rows it holds, and Triton compiled that batch's
    variant while serving: vLLM logged "JIT compilation during inference" of the split and merge kernels,
    about 0.7-0.9 s each on an H200 (RESULTS, 2026-11-27). Call it outside a CUDA graph capture, once per
    layout; the caches are only read (every position is padding)."""
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("warm_decode_attention: called inside a CUDA graph capture; its launches would join the "
                           "graph (call it before capture)")
    Hq, Dk = query.shape[1], query.shape[2]
    Hkv, Dv = key_cache.shape[2], value_cache.shape[3]
    batches = _first_batch_of_each_plan(max_batch, Hq, Hkv, config.attended_tokens, Dk, Dv,
                                        query_bytes=query.element_size(), kv_bytes=key_cache.element_size())

    with _step_pdl(pipelined=config.mode == "asynctls" and config.lagged_selection):
        for batch in batches:
            positions = torch.full((batch, Hkv, config.attended_tokens), -1, dtype=torch.int32, device=query.device)
            sparse_attention_triton(zero_rows_like(query, batch), key_cache, value_cache,
                                    zero_rows_like(block_table, batch), positions, scale, kv_scales=kv_scales)
    return batches


def _index_queries(query, index, config):
    """(query for the block stage, query for the token stage): both in the index's coordinates with a
    basis (`index_basis="pca"`, one rotation launch), except the token stage's with index_bits 16 (exact
    scores on the cache's own keys); attention uses `query` as is."""
    q_index = rotate_query_triton(query, index)
    return q_index, query if config.index_bits == 16 else q_index


def _token_stage_and_attention(query, key_cache, value_cache, block_table, seq_lens, index, config, scale, ws,
                               index_query, token_blocks, q_tokens, scores_written=None, ids_ready=False,
                               write_index_query=False, kv_scales=None):
    """Token scores inside `token_blocks`, their top-k (with the sink and local slots), then exact
    attention over the positions -> (out, positions (B, Hkv, attended_tokens)). `scores_written`: a CUDA
    event recorded on the current stream right after the token-score launch: it completes once the scores
    are written, and the pipelined step's block stage waits for it. `q_tokens`: the query the token
    scores read (in the index's coordinates, `rotate_query`; `query` itself without a basis or with
    index_bits 16)."""
    B, Hkv = query.shape[0], key_cache.shape[2]
    S = config.selection_block_size
    token_scores = token_scores_triton(q_tokens, index, key_cache, block_table, seq_lens, token_blocks, config,
                                       out=None if ws is None else ws.token_scores, softmax_scale=scale,
                                       index_query=index_query, block_ids_ready=ids_ready,
                                       write_index_query=write_index_query, query_in_index_basis=True)
    if scores_written is not None:
        scores_written.record()
    positions = topk_rows(token_scores.view(B * Hkv, config.num_blocks * S), config.token_budget,
                          out=None if ws is None else ws.positions.view(B * Hkv, config.attended_tokens),
                          block_map=token_blocks.view(B * Hkv, config.num_blocks), map_block_size=S,
                          seq_lens=seq_lens, sink_tokens=config.sink_tokens, local_tokens=config.local_tokens,
                          rows_per_seq=Hkv).view(B, Hkv, config.attended_tokens)
    out = sparse_attention_triton(query, key_cache, value_cache, block_table, positions, scale,
                                  out=None if ws is None else ws.out,
                                  workspace=None if ws is None else ws.attention, kv_scales=kv_scales)
    return out, positions


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + (a.numel() and sum((n - 1) * st for n, st in zip(a.shape, a.stride())) + 1) * a.element_size()
    b1 = b0 + (b.numel() and sum((n - 1) * st for n, st in zip(b.shape, b.stride())) + 1) * b.element_size()
    return a0 < b1 and b0 < a1


def _select_blocks(query, index, block_table, seq_lens, config, n_sel, scale, ws, index_query, previous_block_ids,
                   block_ids_out=None):
    """Block scores of `query` (in the index's coordinates) and their top-k -> block ids (B, Hkv,
    num_blocks), into `block_ids_out` if given, else the workspace's buffer that `previous_block_ids`
    (lagged selection, read meanwhile) does not occupy."""
    B, Hkv = query.shape[0], index.block_min.shape[2]
    if config.lagged_selection:
        config = _reference.lagged_block_config(config)  # ranked over the next step's candidates
    block_scores = block_scores_triton(query, index, block_table, seq_lens, config, n_sel,
                                       out=None if ws is None else ws.block_scores, softmax_scale=scale,
                                       index_query=index_query, query_in_index_basis=True)
    out = block_ids_out
    if out is None and ws is not None:
        out = ws.block_ids
        if previous_block_ids is not None and _overlaps(previous_block_ids, ws.block_ids):
            out = ws.spare_block_ids
    ids = topk_rows(block_scores.view(B * Hkv, n_sel), config.num_blocks,
                    out=None if out is None else out.view(B * Hkv, config.num_blocks))
    return ids.view(B, Hkv, config.num_blocks)
