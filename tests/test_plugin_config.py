"""Fast plugin tests (no engine): knobs and their errors, backend-name registration, the CPU platform
hook, and the batch split the metadata builder makes."""

from __future__ import annotations

import importlib.metadata
import logging
import pickle
import sys

import pytest
import torch

from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
from vllm_asynctls.config import AsyncTLSConfig


# ----------------------------------------------------------------------------------------------
# Knobs
# ----------------------------------------------------------------------------------------------


def test_defaults_are_valid_and_resolve_per_attention_kind():
    cfg = AsyncTLSConfig()
    gqa = cfg.sparse_config(head_dim=128, is_mla=False)
    mla = cfg.sparse_config(head_dim=576, is_mla=True)
    assert gqa.index_channels == 32 and mla.index_channels == 128
    # Auto channels are capped at the key head dim (tiny models).
    assert cfg.sparse_config(head_dim=16, is_mla=False).index_channels == 16
    assert cfg.sparse_config(head_dim=96, is_mla=True).index_channels == 96
    assert gqa.num_blocks * gqa.selection_block_size >= gqa.token_budget


def test_from_additional_config_reads_the_asynctls_entry():
    cfg = AsyncTLSConfig.from_additional_config(
        {"asynctls": {"token_budget": 64, "num_blocks": 8, "dense_threshold": 0}, "other_plugin": {"x": 1}}
    )
    assert (cfg.token_budget, cfg.num_blocks, cfg.dense_threshold) == (64, 8, 0)
    assert AsyncTLSConfig.from_additional_config({}) == AsyncTLSConfig()
    assert AsyncTLSConfig.from_additional_config(None) == AsyncTLSConfig()


@pytest.mark.parametrize(
    "knobs, knob, allowed",
    [
        ({"token_budget": 0}, "token_budget", ">= 1"),
        ({"token_budget": True}, "token_budget", ">= 1"),
        ({"num_blocks": 0}, "num_blocks", ">= 1"),
        ({"selection_block_size": 24}, "selection_block_size", "power of two"),
        ({"selection_block_size": 2048}, "selection_block_size", "[1, 1024]"),
        ({"sink_tokens": -1}, "sink_tokens", ">= 0"),
        ({"local_tokens": -5}, "local_tokens", ">= 0"),
        ({"index_channels": 0}, "index_channels", ">= 1"),
        ({"index_channels": 33}, "index_channels", "even"),
        ({"index_bits": 3}, "index_bits", "(4, 8, 16)"),
        ({"index_bits": 8.0}, "index_bits", "(4, 8, 16)"),
        ({"index_channel_metric": "max"}, "index_channel_metric", "mean_abs"),
        ({"group_score": "mean"}, "group_score", "lse"),
        ({"block_bound_weight": 1.5}, "block_bound_weight", "[0, 1]"),
        ({"block_bound_weight": "0.5"}, "block_bound_weight", "[0, 1]"),
        ({"dense_threshold": -1}, "dense_threshold", ">= 0"),
        ({"dense_threshold": 1.5}, "dense_threshold", ">= 0"),
        ({"mode": "fast"}, "mode", "asynctls"),
        ({"token_budget": 4096, "num_blocks": 8}, "token_budget", "num_blocks * selection_block_size"),
        ({"offload": "yes"}, "offload", "true or false"),
        ({"offload": 1}, "offload", "true or false"),
        ({"offload_hot_blocks": 0}, "offload_hot_blocks", ">= 1"),
        ({"offload_hot_blocks": 2.5}, "offload_hot_blocks", ">= 1"),
        ({"offload_prefetch_depth": 0}, "offload_prefetch_depth", ">= 1"),
    ],
)
def test_each_bad_knob_names_itself_and_its_range(knobs, knob, allowed):
    with pytest.raises(ValueError) as err:
        AsyncTLSConfig.from_dict(knobs)
    msg = str(err.value)
    assert knob in msg and allowed in msg, msg
    assert repr(list(knobs.values())[0]) in msg or str(list(knobs.values())[0]) in msg, msg


def test_unknown_knob_and_wrong_type_are_errors():
    with pytest.raises(ValueError, match=r"unknown asynctls knob\(s\) \['token_budgt'\].*token_budget"):
        AsyncTLSConfig.from_dict({"token_budgt": 10})
    with pytest.raises(ValueError, match="must be a JSON object"):
        AsyncTLSConfig.from_additional_config({"asynctls": 5})


def test_offload_knobs():
    cfg = AsyncTLSConfig.from_dict({"offload": True, "offload_hot_blocks": 24, "offload_prefetch_depth": 2})
    assert cfg.offload_config().offload and cfg.offload_config().offload_hot_blocks == 24
    assert AsyncTLSConfig().offload is False  # off unless asked for
    # The selection must not read full keys (they live in host memory): index-only modes and bits.
    for knobs, got in (({"mode": "exact_topk"}, "mode='exact_topk'"), ({"mode": "dense"}, "mode='dense'"),
                       ({"index_bits": 16}, "index_bits=16")):
        with pytest.raises(ValueError, match=r"offload=true needs mode in \['asynctls', 'block_only'\] and "
                                             r"index_bits in \[4, 8\].*got .*" + got):
            AsyncTLSConfig.from_dict({"offload": True, **knobs})
        AsyncTLSConfig.from_dict(knobs)  # fine without offload
    # The hot cache must hold one step's blocks (checked against the cache block size at start-up).
    with pytest.raises(ValueError, match=r"offload_hot_blocks must be >= 11 .*got 10"):
        AsyncTLSConfig(offload=True, offload_hot_blocks=10).offload_config().check_against(
            token_budget=128, num_blocks=8, selection_block_size=16, sink_tokens=16, local_tokens=16, block_size=32)


def test_offload_start_up_checks_against_the_engine():
    from types import SimpleNamespace

    from vllm_asynctls.offload.connector import check_offload_config, kv_transfer_config

    knobs = {"offload": True, "offload_hot_blocks": 11, "token_budget": 128, "num_blocks": 8,
             "sink_tokens": 16, "local_tokens": 16}

    def engine(ktc, use_mla=False, block_size=32, knobs=knobs):
        return SimpleNamespace(
            additional_config={"asynctls": knobs},
            kv_transfer_config=None if ktc is None else SimpleNamespace(**ktc),
            model_config=SimpleNamespace(use_mla=use_mla), cache_config=SimpleNamespace(block_size=block_size),
        )

    check_offload_config(engine(kv_transfer_config()))
    check_offload_config(engine(None, knobs={}))  # offload off: nothing to check
    with pytest.raises(ValueError, match=r"offload=true needs the offload KV connector: pass kv_transfer_config="
                                         r".*AsyncTLSOffloadConnector.*got kv_transfer_config=None"):
        check_offload_config(engine(None))
    with pytest.raises(NotImplementedError, match="GQA/MHA models; this is an MLA model"):
        check_offload_config(engine(kv_transfer_config(), use_mla=True))
    # 16-token cache blocks: 8 selected + 1 sink + 2 local blocks = 11 fit. 8-token blocks: each 16-token
    # selection block spans 2 of them, so 16 selected + 2 sink + 3 local = 21.
    check_offload_config(engine(kv_transfer_config(), block_size=16))
    with pytest.raises(ValueError, match=r"offload_hot_blocks must be >= 21 .*block size 8\); got 11"):
        check_offload_config(engine(kv_transfer_config(), block_size=8))


def test_model_dependent_checks():
    with pytest.raises(ValueError, match=r"index_channels must be in \[1, 64\].*got 128"):
        AsyncTLSConfig(index_channels=128).sparse_config(head_dim=64, is_mla=False)
    with pytest.raises(ValueError, match="selection_block_size must divide the KV cache block size 16; got 64"):
        AsyncTLSConfig(selection_block_size=64).check_cache_block_size(16)
    AsyncTLSConfig(selection_block_size=16).check_cache_block_size(128)


def test_config_is_frozen():
    cfg = AsyncTLSConfig()
    with pytest.raises(Exception):
        cfg.token_budget = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered():
    import vllm_asynctls

    vllm_asynctls.register()
    vllm_asynctls.register()  # idempotent: vLLM may load plugins more than once per process
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "asynctls" and ep.value == "vllm_asynctls:register" for ep in eps)


def test_name_parses_in_any_case_onto_custom(registered):
    from vllm.config.attention import AttentionConfig

    E = registered
    for spelling in ("asynctls", "AsyncTLS", "ASYNCTLS"):
        assert AttentionConfig.validate_backend_before(spelling) is E.CUSTOM
    assert E.CUSTOM.get_path() == "vllm_asynctls.backend.AsyncTLSAttentionBackend"
    # What crosses into the engine-core process is CUSTOM, which unpickles without the plugin.
    assert pickle.loads(pickle.dumps(E["ASYNCTLS"])) is E.CUSTOM
    # The backend's own name resolves back to the same member (vLLM's Attention layer does this).
    from vllm_asynctls.backend import AsyncTLSAttentionBackend, AsyncTLSMLABackend

    assert E[AsyncTLSAttentionBackend.get_name()] is E.CUSTOM
    assert E[AsyncTLSMLABackend.get_name()] is E.CUSTOM
    assert AttentionConfig(backend="asynctls").backend is E.CUSTOM


def _selector(**kw):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    base = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    base.update(kw)
    return AttentionSelectorConfig(**base)


def test_cpu_platform_honours_asynctls_and_only_asynctls(registered, caplog):
    from vllm.platforms.cpu import CpuPlatform

    E = registered
    assert CpuPlatform.get_attn_backend_cls(E.CUSTOM, _selector()) == "vllm_asynctls.backend.AsyncTLSAttentionBackend"
    assert CpuPlatform.get_attn_backend_cls(E.CUSTOM, _selector(head_size=96, use_mla=True)) == (
        "vllm_asynctls.backend.AsyncTLSMLABackend"
    )
    # Without --attention-backend asynctls the platform's own choice is untouched.
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == E.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(E.CPU_ATTN, _selector()) == E.CPU_ATTN.get_path()
    # Layers the sparse path does not cover keep dense attention, with a warning.
    # The plugin logs under vLLM's logger (its handler; it does not propagate to the root logger, where
    # caplog listens), so caplog's handler goes on the plugin's logger itself.
    plugin_logger = logging.getLogger("vllm.asynctls")
    plugin_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.asynctls"):
            path = CpuPlatform.get_attn_backend_cls(E.CUSTOM, _selector(has_sliding_window=True))
    finally:
        plugin_logger.removeHandler(caplog.handler)
    assert path == E.CPU_ATTN.get_path()
    assert "sliding-window" in caplog.text
    assert CpuPlatform.get_attn_backend_cls(E.CUSTOM, _selector(attn_type="encoder_only")) == E.CPU_ATTN.get_path()


def test_cuda_selector_routes_mla_layers_to_the_gpu_mla_backend(registered, monkeypatch):
    """On CUDA `CUSTOM` is bound to the FLASH_ATTN subclass; `patch_cuda_platform` wraps the CUDA selector
    so MLA layers get the TRITON_MLA subclass and every other selection stays vLLM's. vLLM's CPU build
    cannot import its CUDA platform, so a stand-in `vllm.platforms.cuda` takes its place here."""
    import types

    from vllm.platforms.interface import DeviceCapability

    from vllm_asynctls import _vllm_compat

    calls = []

    class CudaPlatformBase:
        @classmethod
        def get_device_capability(cls, device_id=0):
            return DeviceCapability(9, 0)

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            calls.append((cls.__name__, selected_backend, attn_selector_config.use_mla))
            return "vllm's choice"

    class NvmlCudaPlatform(CudaPlatformBase):  # what current_platform is on a GPU machine
        pass

    monkeypatch.setitem(sys.modules, "vllm.platforms.cuda", types.SimpleNamespace(CudaPlatformBase=CudaPlatformBase))
    _vllm_compat.patch_cuda_platform()
    _vllm_compat.patch_cuda_platform()  # idempotent: vLLM may load plugins more than once per process
    E = registered
    mla = dict(head_size=576, dtype=torch.bfloat16, block_size=16, use_mla=True)
    assert NvmlCudaPlatform.get_attn_backend_cls(E.CUSTOM, _selector(**mla)) == _vllm_compat.GPU_MLA_BACKEND_PATH
    assert calls == []
    assert NvmlCudaPlatform.get_attn_backend_cls(E.TRITON_MLA, _selector(**mla)) == "vllm's choice"
    assert NvmlCudaPlatform.get_attn_backend_cls(E.CUSTOM, _selector(head_size=128)) == "vllm's choice"
    assert calls == [("NvmlCudaPlatform", E.TRITON_MLA, True), ("NvmlCudaPlatform", E.CUSTOM, False)]
    # The model's own dtype may be named (vLLM's GPU parents accept the name), and fp8 with per-tensor
    # scales (TRITON_MLA's e4m3 cache) is read; any other KV dtype is refused.
    for kv_cache_dtype in ("bfloat16", "fp8", "fp8_e4m3"):
        assert NvmlCudaPlatform.get_attn_backend_cls(
            E.CUSTOM, _selector(**dict(mla, kv_cache_dtype=kv_cache_dtype))) == _vllm_compat.GPU_MLA_BACKEND_PATH
    with pytest.raises(NotImplementedError,
                       match="kv_cache_dtype must be 'auto' or 'bfloat16' or 'fp8' or 'fp8_e4m3'.*got 'fp8_e5m2'"):
        NvmlCudaPlatform.get_attn_backend_cls(E.CUSTOM, _selector(**dict(mla, kv_cache_dtype="fp8_e5m2")))
    with pytest.raises(NotImplementedError, match="got 'float16'"):
        NvmlCudaPlatform.get_attn_backend_cls(E.CUSTOM, _selector(**dict(mla, kv_cache_dtype="float16")))
    with pytest.raises(NotImplementedError, match="trained sparse attention"):
        NvmlCudaPlatform.get_attn_backend_cls(E.CUSTOM, _selector(**dict(mla, use_sparse=True)))
    with pytest.raises(ValueError, match="cannot serve this MLA model"):
        NvmlCudaPlatform.get_attn_backend_cls(E.CUSTOM, _selector(**dict(mla, dtype=torch.float32)))
    with pytest.raises(ValueError, match="cannot serve this MLA model.*PCP not supported"):
        NvmlCudaPlatform.get_attn_backend_cls(E.CUSTOM, _selector(**dict(mla, use_pcp=True)))


def test_gpu_backends_accept_the_model_dtype_by_name_and_refuse_other_kv_cache_dtypes():
    """What vLLM's CUDA selector hears from both GPU backends' `validate_configuration` (the shared traits,
    over a stand-in parent: the CUDA backends cannot be imported from vLLM's CPU build)."""
    from vllm_asynctls._vllm_compat import AsyncTLSGPUBackendTraits

    class Parent:
        @classmethod
        def validate_configuration(cls, **kwargs):
            return []

    class Backend(AsyncTLSGPUBackendTraits, Parent):
        pass

    class Fp8Backend(Backend):  # as the GQA GPU backend (FLASH_ATTN's own check then decides per device)
        fp8_kv_cache = True

    assert set(Backend.supported_kv_cache_dtypes) == {"auto", "float16", "bfloat16"}
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        for backend in (Backend, Fp8Backend):
            assert backend.validate_configuration(dtype=dtype, kv_cache_dtype="auto") == []
            assert backend.validate_configuration(dtype=dtype, kv_cache_dtype=name) == []
    (reason,) = Backend.validate_configuration(dtype=torch.bfloat16, kv_cache_dtype="float16")
    assert "kv_cache_dtype must be 'auto' or 'bfloat16'" in reason and "got 'float16'" in reason
    (reason,) = Backend.validate_configuration(dtype=torch.float16, kv_cache_dtype="fp8_e4m3")
    assert "'auto' or 'float16' (the model's" in reason and "got 'fp8_e4m3'" in reason
    (reason,) = Backend.validate_configuration(dtype=torch.float32, kv_cache_dtype="bfloat16")
    assert "kv_cache_dtype must be 'auto' (the model's torch.float32" in reason
    for name in ("fp8", "fp8_e4m3"):
        assert Fp8Backend.validate_configuration(dtype=torch.bfloat16, kv_cache_dtype=name) == []
    (reason,) = Fp8Backend.validate_configuration(dtype=torch.bfloat16, kv_cache_dtype="fp8_e5m2")
    assert "'auto' or 'bfloat16' or 'fp8' or 'fp8_e4m3'" in reason and "got 'fp8_e5m2'" in reason
    # The impls' own check (no model dtype there) lets the names through and refuses quantised caches,
    # except the fp8 names where the impl reads them.
    from vllm.v1.attention.backend import AttentionType

    from vllm_asynctls._vllm_compat import (
        FP8_KV_CACHE_DTYPES, UNQUANTISED_KV_CACHE_DTYPES, unsupported_impl_features,
    )

    decoder = (None, None, None, None, AttentionType.DECODER)
    assert unsupported_impl_features(*decoder, "bfloat16") == []
    assert unsupported_impl_features(*decoder, "fp8") == [
        "kv_cache_dtype 'fp8' (allowed: 'auto', 'float16', 'bfloat16')"]
    assert unsupported_impl_features(*decoder, "fp8",
                                     kv_cache_dtypes=UNQUANTISED_KV_CACHE_DTYPES + FP8_KV_CACHE_DTYPES) == []


def test_gpu_backends_refuse_per_head_quant_scales_at_selection():
    """A checkpoint with per-head KV / query scales (compressed-tensors `attn_head`) is refused by the
    selector through vLLM's own check, not at the first decode."""
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import AttentionBackend

    from vllm_asynctls._vllm_compat import AsyncTLSGPUBackendTraits

    class Backend(AsyncTLSGPUBackendTraits, AttentionBackend):
        supported_dtypes = [torch.bfloat16]

    common = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                  has_sink=False, use_sparse=False, use_mm_prefix=False, device_capability=DeviceCapability(9, 0),
                  attn_type="decoder")
    assert Backend.validate_configuration(use_per_head_quant_scales=False, **common) == []
    assert Backend.validate_configuration(use_per_head_quant_scales=True, **common) == [
        "per-head quant scales not supported"]


def test_fp8_decode_inputs_dequantise_the_query_in_the_model_dtype():
    """vLLM quantises the query by a per-tensor `_q_scale` (0-d by default, (1,) from a checkpoint's KV
    scheme); the decode path must get it back in the model dtype (the workspace's), with the caches as
    e4m3 views of vLLM's byte tensors and the layer's k / v scales."""
    from vllm_asynctls.fp8_kv import fp8_decode_inputs

    q = torch.randn(3, 8, 16)
    q8 = (q / 0.05).to(torch.float8_e4m3fn)
    cache = torch.randint(0, 120, (4, 16, 2, 32), dtype=torch.uint8)
    k_cache, v_cache = cache.split(16, dim=-1)
    k_scale, v_scale = torch.tensor(0.3), torch.tensor([0.7])
    for q_scale in (torch.tensor(0.05), torch.tensor([0.05])):
        got, kc, vc, scales = fp8_decode_inputs(q8, k_cache, v_cache, q_scale, k_scale, v_scale, torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == q.shape
        torch.testing.assert_close(got, (q8.float() * 0.05).to(torch.bfloat16))
        assert kc.dtype == vc.dtype == torch.float8_e4m3fn
        assert kc.stride() == k_cache.stride() and kc.data_ptr() == k_cache.data_ptr()  # views, no copy
        assert scales[0] is k_scale and scales[1] is v_scale
    bf16 = q.to(torch.bfloat16)  # a query that arrives unquantised is passed through
    assert fp8_decode_inputs(bf16, k_cache, v_cache, torch.tensor(0.05), k_scale, v_scale, torch.bfloat16)[0] is bf16
    with pytest.raises(ValueError, match=r"per tensor \(one element\); got shape \(2,\)"):
        fp8_decode_inputs(q8, k_cache, v_cache, torch.ones(2), k_scale, v_scale, torch.bfloat16)


def test_gpu_engine_checks_name_context_parallelism_and_unfuse_the_mla_cache_write():
    from types import SimpleNamespace

    from vllm_asynctls import _vllm_compat

    cfg = AsyncTLSConfig()
    sparse = cfg.sparse_config(head_dim=576, is_mla=True)

    def engine(dcp=1):
        return SimpleNamespace(speculative_config=None,
                               parallel_config=SimpleNamespace(enable_dbo=False, decode_context_parallel_size=dcp))

    _vllm_compat.check_cuda_engine(engine(), cfg, sparse)
    with pytest.raises(NotImplementedError, match="decode context parallelism; got --decode-context-parallel-size 2"):
        _vllm_compat.check_cuda_engine(engine(dcp=2), cfg, sparse)
    # An fp8 KV cache holds the keys quantised: exact token scores (index_bits=16) are refused at start-up.
    fp8 = engine()
    fp8.cache_config = SimpleNamespace(cache_dtype="fp8")
    _vllm_compat.check_cuda_engine(fp8, cfg, sparse)
    with pytest.raises(ValueError, match="knob index_bits=16 .*got index_bits=16 with --kv-cache-dtype fp8"):
        _vllm_compat.check_cuda_engine(fp8, cfg, cfg.sparse_config(head_dim=128, is_mla=False).with_(index_bits=16))
    vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(
        pass_config=SimpleNamespace(fuse_rope_kvcache_cat_mla=True)))
    _vllm_compat.keep_mla_cache_write_unfused(vllm_config)
    assert vllm_config.compilation_config.pass_config.fuse_rope_kvcache_cat_mla is False


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype must be 'auto' .*got 'fp8'"),
        (dict(kv_cache_dtype="float32"), "kv_cache_dtype must be 'auto' .*got 'float32'"),
        (dict(use_sparse=True), "trained sparse attention"),
    ],
)
def test_unsupported_models_fail_at_selection(registered, kw, match):
    from vllm.platforms.cpu import CpuPlatform

    with pytest.raises(NotImplementedError, match=match):
        CpuPlatform.get_attn_backend_cls(registered.CUSTOM, _selector(**kw))


# ----------------------------------------------------------------------------------------------
# The builder's split of a batch into dense and sparse tokens
# ----------------------------------------------------------------------------------------------


def test_split_and_subset_of_a_mixed_batch():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_asynctls.backend import _split_requests, _subset_requests

    # requests: decode (ctx 5000), prefill of 3 tokens (ctx 3), decode (ctx 10), decode (ctx 9000)
    query_lens = torch.tensor([1, 3, 1, 1])
    qsl = torch.zeros(5, dtype=torch.int32)
    qsl[1:] = torch.cumsum(query_lens, 0)
    seq_lens = torch.tensor([5000, 3, 10, 9000], dtype=torch.int32)
    block_table = torch.arange(16, dtype=torch.int32).view(4, 4)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=4, num_actual_tokens=6,
        max_query_len=3, max_seq_len=9000, block_table_tensor=block_table,
        slot_mapping=torch.arange(100, 106, dtype=torch.int64),
    )
    qlens, sparse = _split_requests(qsl, seq_lens, dense_threshold=4096)
    assert qlens.tolist() == [1, 3, 1, 1] and sparse.tolist() == [True, False, False, True]
    sub, token_ids = _subset_requests(cm, (~sparse).nonzero().squeeze(1), qlens, seq_lens)
    assert token_ids.tolist() == [1, 2, 3, 4]  # the prefill's 3 rows, then the short decode's row
    assert sub.query_start_loc_cpu.tolist() == [0, 3, 4]
    assert sub.seq_lens.tolist() == [3, 10] and sub.num_reqs == 2 and sub.num_actual_tokens == 4
    assert sub.max_query_len == 3 and sub.max_seq_len == 10
    assert sub.block_table_tensor.tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert sub.slot_mapping.tolist() == [101, 102, 103, 104]
    # dense_threshold 0 sends every decode token sparse, never a prefill.
    _, sparse0 = _split_requests(qsl, seq_lens, dense_threshold=0)
    assert sparse0.tolist() == [True, False, True, True]


def test_counters_snapshot_shares_and_reads():
    from vllm_asynctls.counters import AsyncTLSCounters

    c = AsyncTLSCounters()
    c.record_step(prefill_tokens=100, dense_context_lens=[10], sparse_context_lens=[5000, 6000, 7000])
    positions = torch.full((3, 2, 8), -1, dtype=torch.int32)
    positions[..., :6] = 1  # 6 attended positions per (token, kv head)
    c.record_sparse_reads(positions)
    s = c.snapshot()
    assert s["decode_tokens_sparse"] == 3 and s["decode_tokens_dense"] == 1
    assert s["sparse_share"] == pytest.approx(0.75)
    assert s["tokens_read_per_sparse_decode"] == pytest.approx(6.0)
    assert s["tokens_read_per_dense_decode"] == pytest.approx(10.0)
    assert s["context_per_sparse_decode"] == pytest.approx(6000.0)


def test_counters_say_reads_were_not_counted_instead_of_zero():
    # The GPU backend counts sparse decodes but not their reads (decode is captured in CUDA graphs):
    # the snapshot must not claim they read nothing.
    from vllm_asynctls.counters import AsyncTLSCounters
    from vllm_asynctls.demo import _tokens_read

    c = AsyncTLSCounters()
    assert c.snapshot()["tokens_read_per_sparse_decode"] == 0.0  # no sparse decode yet
    c.record_step(prefill_tokens=0, dense_context_lens=[], sparse_context_lens=[5000, 6000])
    s = c.snapshot()
    assert s["decode_tokens_sparse"] == 2 and s["tokens_read_per_sparse_decode"] is None
    assert _tokens_read(s) == "(not counted on this backend)"


def test_key_and_value_views_read_cpu_attn_cache_layout():
    """The sparse path reads CPU_ATTN's cache through views; they must match what vLLM's own
    `cpu_attn_reshape_and_cache` wrote (keys are stored transposed per block and head)."""
    from vllm import _custom_ops as ops

    from vllm_asynctls.backend import _paged_kv_views

    num_blocks, num_kv_heads, block_size, head_dim = 3, 2, 32, 64
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim)
    n = 70
    key, value = torch.randn(n, num_kv_heads, head_dim), torch.randn(n, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:n]
    kv = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, head_dim)
    k_region, v_region = kv.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, k_region, v_region, slots, "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    key_cache, value_cache = _paged_kv_views(kv_cache)  # (nb, bs, Hkv, D)
    assert key_cache.data_ptr() == kv_cache.data_ptr()  # views, not copies
    blocks, offsets = slots // block_size, slots % block_size
    torch.testing.assert_close(key_cache[blocks, offsets], key, rtol=0, atol=0)
    torch.testing.assert_close(value_cache[blocks, offsets], value, rtol=0, atol=0)


def test_index_is_counted_in_an_explicit_kv_cache_budget():
    from types import SimpleNamespace

    import torch

    from vllm_asynctls._vllm_compat import reserve_index_memory

    cfg = AsyncTLSConfig.from_dict({"selection_block_size": 16, "index_bits": 4})
    # D = 64 float32: K/V 512 B per token and kv head; index (2*64 + 4)/16 + 32*4/8 + 4 = 28.25 B
    # (int8 summaries with a float32 scale per selection block, then the token codes and scale).
    assert cfg.index_fraction(64, is_mla=False, dtype_bytes=4) == pytest.approx(28.25 / 540.25)
    # MLA keeps one latent row (no separate V): 576 * 2 B against (2*576 + 4)/16 + 128*4/8 + 4 = 140.25 B.
    assert cfg.index_fraction(576, is_mla=True, dtype_bytes=2) == pytest.approx(140.25 / (1152 + 140.25))

    vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(kv_cache_memory_bytes=2**30), model_config=SimpleNamespace(dtype=torch.float32)
    )
    reserve_index_memory(vllm_config, cfg, 64, False)
    shrunk = vllm_config.cache_config.kv_cache_memory_bytes
    assert shrunk == int(2**30 * (1 - 28.25 / 540.25))
    reserve_index_memory(vllm_config, cfg, 64, False)  # a second config check must not shrink it again
    assert vllm_config.cache_config.kv_cache_memory_bytes == shrunk

    auto = SimpleNamespace(cache_config=SimpleNamespace(kv_cache_memory_bytes=None, gpu_memory_utilization=0.9),
                           model_config=vllm_config.model_config)
    reserve_index_memory(auto, cfg, 64, False)  # CPU: vLLM sizes from free memory, nothing to change
    assert auto.cache_config.kv_cache_memory_bytes is None and auto.cache_config.gpu_memory_utilization == 0.9
    # GPU without an explicit budget: the utilization drops by the index's share, once, whatever the
    # number of config checks (the engine core re-runs it on the config it received).
    reserve_index_memory(auto, cfg, 64, False, on_cuda=True)
    lowered = auto.cache_config.gpu_memory_utilization
    assert lowered == pytest.approx(0.9 * (1 - 28.25 / 540.25))
    reserve_index_memory(auto, cfg, 64, False, on_cuda=True)
    assert auto.cache_config.gpu_memory_utilization == lowered
    assert auto.cache_config.kv_cache_memory_bytes is None
    # An fp8 KV cache takes a byte per channel, so the same index is a larger share of it.
    fp8 = SimpleNamespace(cache_config=SimpleNamespace(kv_cache_memory_bytes=2**30, cache_dtype="fp8"),
                          model_config=SimpleNamespace(dtype=torch.bfloat16))
    reserve_index_memory(fp8, cfg, 64, False, on_cuda=True)
    assert fp8.cache_config.kv_cache_memory_bytes == int(2**30 * (1 - 28.25 / (128 + 28.25)))


def test_mla_index_is_written_from_the_unquantised_rows_under_an_fp8_cache():
    """Under `--kv-cache-dtype fp8` vLLM hands the MLA impl's cache update a byte tensor: the index must be
    allocated for and written from the rows in the model dtype, exactly as over an unquantised cache."""
    from asynctls_tip_kernels import sparse_decode_reference as ref
    from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
    from vllm_asynctls.layer_index import LayerIndex
    from vllm_asynctls.mla_decode import mla_key_rows, write_mla_index

    g = torch.Generator().manual_seed(5)
    L, P, cbs, nb = 32, 16, 16, 6
    config = SparseAttentionConfig.for_mla(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                                           local_tokens=16, index_channels=16)
    kv_c = (torch.randn(40, L, generator=g) * 3).to(torch.bfloat16)
    k_pe = torch.randn(40, 1, P, generator=g).to(torch.bfloat16)
    slots = torch.randperm(nb * cbs, generator=g)[:40]
    written = {}
    for cache_dtype in (torch.uint8, torch.bfloat16):  # fp8 (vLLM's byte view) and 'auto'
        lix = LayerIndex(config, 1, L + P, is_mla=True)
        write_mla_index(lix, kv_c, k_pe, torch.zeros(nb, cbs, L + P, dtype=cache_dtype), slots)
        assert lix.index.key_dtype == torch.bfloat16
        written[cache_dtype] = lix.index
    want = ref.allocate_index(nb, cbs, 1, L + P, config, torch.bfloat16, "cpu")
    ref.write_index(want, mla_key_rows(kv_c, k_pe, torch.bfloat16), slots, config)
    for got in written.values():
        for name in ("block_min", "block_max", "block_scale", "codes", "scales"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_warm_once_warms_each_layout_once_per_process_and_then_reads_nothing(monkeypatch):
    """`WarmOnce`: a layer warms at its first call outside a capture unless a layer of this process warmed the
    same layout; after its first call (warmed or skipped) neither the layout nor the warm-up is evaluated again."""
    from vllm_asynctls import kernel_warmup
    from vllm_asynctls.kernel_warmup import WarmOnce

    monkeypatch.setattr(WarmOnce, "_warmed_layouts", set())
    capturing = [True]
    monkeypatch.setattr(kernel_warmup, "capturing", lambda: capturing[0])
    layouts, warms = [], []

    def call(layer, key):
        layer(lambda: layouts.append(key) or key, lambda: warms.append(key))

    first, second, other = WarmOnce(), WarmOnce(), WarmOnce()
    call(first, ("write", 1))  # while capturing: nothing runs
    assert (layouts, warms) == ([], [])
    capturing[0] = False
    call(first, ("write", 1))
    call(second, ("write", 1))  # the same layout, another layer: skipped
    call(other, ("attention", 1))  # another kind
    assert warms == [("write", 1), ("attention", 1)] and len(layouts) == 3
    for layer in (first, second, other):
        call(layer, ("write", 2))
    assert len(layouts) == 3 and len(warms) == 2


def test_gpu_index_writes_warm_every_writer_variant_once_outside_a_capture(monkeypatch):
    """On the Triton path the first write outside a CUDA graph capture first compiles every writer variant
    (`warm_write_index`, with the call's own key layout), so prefill sizes no decode graph ran do not compile
    while serving; later writes, and writes while capturing, only write; another layer whose key and index
    layouts a layer already warmed in this process (Triton's compiled kernels are per process) only writes,
    and one with other layouts warms too."""
    from asynctls_tip_kernels import index_write
    from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
    from vllm_asynctls import kernel_warmup
    from vllm_asynctls.kernel_warmup import WarmOnce
    from vllm_asynctls.layer_index import LayerIndex

    calls = []
    monkeypatch.setattr(index_write, "warm_write_index",
                        lambda index, key, config, ws, key_tail=None: calls.append(("warm", key, key_tail)))
    monkeypatch.setattr(index_write, "write_index_triton",
                        lambda index, key, slots, config, workspace=None, key_tail=None:
                        calls.append(("write", key, key_tail)))
    monkeypatch.setattr(WarmOnce, "_warmed_layouts", set())
    capturing = [False]
    monkeypatch.setattr(kernel_warmup, "capturing", lambda: capturing[0])
    config = SparseAttentionConfig.for_mla(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                                           local_tokens=16, index_channels=16)

    def layer(num_cache_blocks=4, dtype=torch.bfloat16):
        lix = LayerIndex(config, 1, 48, is_mla=True)
        lix.ensure(num_cache_blocks, 16, dtype, "cpu")
        lix._write_workspace = object()  # what a CUDA index gets: the Triton path
        lix.calibrated = True
        return lix

    lix = layer()
    kv_c, k_pe, slots = torch.randn(5, 1, 32), torch.randn(5, 1, 16), torch.arange(5)
    capturing[0] = True
    lix.write(kv_c, slots, key_tail=k_pe)  # while capturing: no warm-up (it would launch into the graph)
    capturing[0] = False
    lix.write(kv_c, slots, key_tail=k_pe)
    lix.write(kv_c[:2], slots[:2], key_tail=k_pe[:2])
    assert [c[0] for c in calls] == ["write", "warm", "write", "write"]
    assert calls[1][1] is not None and calls[1][1].shape == (5, 1, 32) and calls[1][2].shape == (5, 1, 16)
    calls.clear()
    layer().write(kv_c[:3], slots[:3], key_tail=k_pe[:3])  # same layouts, another call length: only writes
    assert [c[0] for c in calls] == ["write"]
    calls.clear()
    layer().write(kv_c, slots)  # no key tail
    layer(num_cache_blocks=8).write(kv_c, slots, key_tail=k_pe)  # another index shape
    layer(dtype=torch.float16).write(kv_c, slots, key_tail=k_pe)  # another index dtype
    layer().write(torch.randn(5, 1, 64)[..., :32], slots, key_tail=k_pe)  # other key strides
    assert [c[0] for c in calls] == ["warm", "write"] * 4


def test_gpu_decode_warms_every_attention_variant_once_outside_a_capture(monkeypatch):
    """A GPU layer's first decode outside a CUDA graph capture first compiles the attention of every decode batch
    up to the engine's largest (`warm_decode_attention`, with the call's own inputs), so a step mixing prefill and
    decode rows does not compile one while serving; later decodes, decodes while capturing, and other layers
    with the same layouts (Triton's compiled kernels are per process) do not warm."""
    from vllm_asynctls import decode_workspaces, kernel_warmup
    from vllm_asynctls.decode_workspaces import DecodeAttentionWarmup
    from vllm_asynctls.kernel_warmup import WarmOnce

    calls = []
    monkeypatch.setattr(decode_workspaces, "warm_decode_attention", lambda *args: calls.append(args))
    monkeypatch.setattr(WarmOnce, "_warmed_layouts", set())
    capturing = [True]
    monkeypatch.setattr(kernel_warmup, "capturing", lambda: capturing[0])
    q, cache, table = torch.zeros(3, 4, 8), torch.zeros(5, 16, 2, 8), torch.zeros(3, 7, dtype=torch.int32)
    scales = (torch.ones(1), torch.ones(1))
    config = SparseAttentionConfig(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                                   local_tokens=16, index_channels=8)
    layer = DecodeAttentionWarmup(max_batch=48)
    layer(q, cache, cache, table, config, 0.125, scales)  # while capturing: nothing (it would launch into the graph)
    assert calls == []
    capturing[0] = False
    layer(q, cache, cache, table, config, 0.125, scales)
    layer(q, cache, cache, table, config, 0.125, scales)
    assert calls == [(q, cache, cache, table, config, 0.125, 48, scales)]
    DecodeAttentionWarmup(max_batch=48)(q[:1], cache, cache, table[:1], config, 0.125, scales)  # same layouts
    assert len(calls) == 1
    DecodeAttentionWarmup(max_batch=48)(q.double(), cache, cache, table, config, 0.125, scales)  # another dtype
    DecodeAttentionWarmup(max_batch=48)(q, cache, cache, table, config, 0.125, None)  # an unquantised cache
    DecodeAttentionWarmup(max_batch=64)(q, cache, cache, table, config, 0.125, scales)  # more batches
    assert len(calls) == 4


def test_gpu_gqa_decode_warms_with_the_operators_own_inputs(monkeypatch):
    """The GQA impl's decode hands its warm-up exactly what it hands the operator, before the operator runs."""
    from vllm_asynctls import gpu_backend
    from vllm_asynctls.gpu_backend import AsyncTLSDecodeMetadata, AsyncTLSFlashAttentionImpl

    order = []
    impl = object.__new__(AsyncTLSFlashAttentionImpl)
    impl.head_size, impl.kv_fp8, impl.scale = 8, False, 0.3
    impl.sparse_config = SparseAttentionConfig(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                                               local_tokens=16, index_channels=8)

    class Index:
        index = "index"

        def previous_blocks(self, block_table, seq_lens):
            return None

        def record_blocks(self, block_table, seq_lens, block_ids):
            order.append("record")

    impl.layer_index = Index()
    impl.warm_attention = lambda *args: order.append(("warm", args))

    def operator(q, key_cache, value_cache, block_table, seq_lens, index, config, scale, **kw):
        order.append(("operator", (q, key_cache, value_cache, block_table, config, scale, kw["kv_scales"])))
        return torch.zeros(2, 4, 8), None, None

    monkeypatch.setattr(gpu_backend, "sparse_decode_triton", operator)
    kv_cache = torch.zeros(5, 2, 16, 16)  # vLLM's logical (blocks, kv heads, block size, 2 x head size)
    md = AsyncTLSDecodeMetadata(num_actual_tokens=2, num_reqs=2, block_table=torch.zeros(2, 3, dtype=torch.int32),
                                seq_lens=torch.ones(2, dtype=torch.int32), workspace=None)
    impl._sparse_decode(None, torch.randn(6, 4, 8), kv_cache, md, torch.zeros(6, 4 * 8))
    (warm, warm_args), (op, op_args), record = order
    assert (warm, op, record) == ("warm", "operator", "record")
    assert len(warm_args) == len(op_args)
    for a, b in zip(warm_args, op_args):
        assert a is b or (isinstance(a, torch.Tensor) and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
                          and a.shape == b.shape), (a, b)


@pytest.mark.parametrize("basis", ["channels", "pca"])
def test_an_index_written_in_two_parts_calibrates_on_the_joined_keys(monkeypatch, basis):
    """The first real write calibrates the index (channels or basis) on the whole key: writing the latent and rope
    parts apart gives the index that writing the joined rows gives."""
    from asynctls_tip_kernels.sparse_config import SparseAttentionConfig
    from vllm_asynctls import layer_index
    from vllm_asynctls.layer_index import LayerIndex

    monkeypatch.setattr(layer_index, "_is_dummy_run", lambda: False)
    g = torch.Generator().manual_seed(8)
    config = SparseAttentionConfig.for_mla(selection_block_size=16, num_blocks=4, token_budget=32, sink_tokens=16,
                                           local_tokens=16, index_channels=16, index_basis=basis)
    kv_c = torch.randn(40, 1, 32, generator=g) * torch.linspace(0.1, 3, 32)
    k_pe = torch.randn(40, 1, 16, generator=g) * 4  # the largest channels are the rope part's
    slots = torch.randperm(96, generator=g)[:40]
    apart, joined = LayerIndex(config, 1, 48, is_mla=True), LayerIndex(config, 1, 48, is_mla=True)
    for lix in (apart, joined):
        lix.ensure(6, 16, torch.float32, "cpu")
    apart.write(kv_c, slots, key_tail=k_pe)
    joined.write(torch.cat([kv_c, k_pe], dim=-1), slots)
    assert apart.calibrated and joined.calibrated
    if basis == "channels":  # rope channels chosen: the tail was seen
        assert bool((apart.index.channel_ids >= 32).any())
    else:  # the leading direction lies mostly in the rope part
        assert float(apart.index.basis[0, 0, 32:].norm()) > 0.5
    for name in ("channel_ids", "block_min", "block_max", "block_scale", "codes", "scales", "basis"):
        a, b = getattr(apart.index, name), getattr(joined.index, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.uint8], ids=["auto", "fp8"])
def test_gpu_builders_size_their_decode_workspaces_for_the_caches_dtype(monkeypatch, mla, kv_dtype):
    """Both GPU metadata builders hand vLLM's `kv_cache_spec.dtype` (uint8 under `--kv-cache-dtype fp8`) to their
    decode workspaces: an fp8 cache's attention takes another split count, and a workspace built for the other
    cache kind is refused at the first decode. The parents' constructors (CUDA-only state) are replaced by the
    attributes the builders read."""
    from types import SimpleNamespace

    from vllm_asynctls import gpu_backend, gpu_mla_backend

    def parent_init(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        self.device, self.block_size = device, kv_cache_spec.block_size
        self.num_heads_q, self.num_heads_kv, self.headdim = 32, 8, 128  # FLASH_ATTN's builder
        self.num_heads, self.mla_dims = 16, SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64)  # TRITON_MLA's

    if mla:
        builder_cls = gpu_mla_backend.AsyncTLSTritonMLAMetadataBuilder
        monkeypatch.setattr(gpu_mla_backend.TritonMLAMetadataBuilder, "__init__", parent_init)
    else:
        builder_cls = gpu_backend.AsyncTLSFlashAttentionMetadataBuilder
        monkeypatch.setattr(gpu_backend.FlashAttentionMetadataBuilder, "__init__", parent_init)
        monkeypatch.setattr(builder_cls, "_init_reorder_batch_threshold", lambda self, threshold: None)
    vllm_config = SimpleNamespace(additional_config=None, model_config=SimpleNamespace(dtype=torch.bfloat16),
                                  scheduler_config=SimpleNamespace(max_num_seqs=4),
                                  compilation_config=SimpleNamespace(max_cudagraph_capture_size=4))
    builder = builder_cls(SimpleNamespace(block_size=64, dtype=kv_dtype), ["layer.0"], vllm_config, "cpu")
    workspace = builder.workspaces.get(4, 8)
    assert builder.workspaces.kv_dtype is kv_dtype
    assert workspace.key[-1] == (kv_dtype == torch.uint8)  # the workspace's cache kind: fp8 or not
    assert workspace.key[:5] == ((4, 16, 1, 576, 512) if mla else (4, 32, 8, 128, 128))
