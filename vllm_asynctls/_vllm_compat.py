"""The only place that adapts to vLLM internals. Covers vLLM 0.32 (the 0.32.0 CPU build, tested in CI)
and vLLM 0.26 on CUDA (the 0.26.0 build on the lent H100); the hooks used here
(`AttentionBackendEnum.CUSTOM`, `register_backend`, the enum's `_member_map_`,
`Platform.get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)`,
`Platform.check_and_update_config`) have the same shape in both.

Three adaptations, each installed by `install()`, which the `vllm.general_plugins` entry point runs in
every vLLM process (API server, engine core, workers) before any config is parsed or model built:

1. The name. `--attention-backend asynctls` is parsed with `AttentionBackendEnum[value.upper()]`.
   A new member made by `register_backend("ASYNCTLS", ...)` does not survive being pickled into the
   engine-core process: vLLM pickles the config into it before plugins run there, and unpickling looks
   the member up by value. So "ASYNCTLS" is added as an *alias* of the built-in `CUSTOM` member (the
   enum's own alias mechanism: a second name in `_member_map_`). The parsed value is `CUSTOM` itself,
   which every process knows, and whose class path the plugin registers in every process.
2. The override: `register_backend(AttentionBackendEnum.CUSTOM, <our GQA backend>)`.
3. The CPU platform's backend choice. `CpuPlatform.get_attn_backend_cls` returns `CPU_ATTN` / `CPU_MLA` whatever was
   asked for. It is wrapped: when the selected backend is `CUSTOM` bound to this plugin, it returns our
   GQA or MLA backend (or, for layers we do not cover, the CPU backend with a logged warning); for any
   other selection it calls the original untouched, so models served without
   `--attention-backend asynctls` never see this plugin.
4. Start-up validation. `CpuPlatform.check_and_update_config` (run once, in the process that parses
   the arguments, before any engine process starts) is wrapped to validate the asynctls knobs and
   check `selection_block_size` against the cache block size the platform just settled, so a bad knob
   fails `LLM(...)` / `vllm serve` immediately with the knob's name instead of inside a worker.

On CUDA, `CUSTOM` is bound to `gpu_backend.AsyncTLSFlashAttentionBackend` (a FLASH_ATTN subclass)
instead, and the CUDA platform's own selector resolves it (through the backend's
`validate_configuration`, which names what a model needs that the backend lacks). Adaptation 3 there
only routes MLA layers: `CudaPlatformBase.get_attn_backend_cls` is wrapped so that, with asynctls
selected, an MLA layer gets `gpu_mla_backend.AsyncTLSTritonMLABackend` (a TRITON_MLA subclass),
checked by its own `validate_configuration`. The KV-cache layout differences between 0.26
(`get_kv_cache_shape` / `get_kv_cache_stride_order`) and 0.32 stay inside the parent backends we subclass.
"""

from __future__ import annotations

import logging

BACKEND_NAME = "ASYNCTLS"
GQA_BACKEND_PATH = "vllm_asynctls.backend.AsyncTLSAttentionBackend"
MLA_BACKEND_PATH = "vllm_asynctls.backend.AsyncTLSMLABackend"
GPU_BACKEND_PATH = "vllm_asynctls.gpu_backend.AsyncTLSFlashAttentionBackend"
GPU_MLA_BACKEND_PATH = "vllm_asynctls.gpu_mla_backend.AsyncTLSTritonMLABackend"
OUR_BACKEND_PATHS = (GQA_BACKEND_PATH, GPU_BACKEND_PATH)

logger = logging.getLogger("vllm.asynctls")  # under vLLM's logger: its handler, level and format

_PATCH_MARK = "_asynctls_patched"


class AsyncTLSBackendTraits:
    """What the GQA backends (CPU and GPU) declare to vLLM's selector, whatever backend they extend:
    the plugin's name, the KV-cache dtype it reads, and the layer kinds the sparse path covers (decoder
    self-attention without a sliding window). Put it first among the bases."""

    supported_kv_cache_dtypes = ["auto"]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return attn_type == AttentionType.DECODER

# vLLM 0.32's CPU MLA decode kernel (csrc/cpu/mla_decode.cpp, CPU_MLA's dense decode path) compiles for
# kv_lora_rank + qk_rope_head_dim = 576 only (DeepSeek-V2/V3's 512 + 64).
CPU_MLA_DENSE_DECODE_HEAD_SIZE = 576


def check_cpu_mla_dense_threshold(key_dim: int, dense_threshold: int) -> None:
    """MLA models of another latent width can only decode through the AsyncTLS path on CPU."""
    if key_dim != CPU_MLA_DENSE_DECODE_HEAD_SIZE and dense_threshold != 0:
        raise ValueError(
            f"asynctls knob dense_threshold must be 0 for this model: vLLM's CPU MLA decode kernel "
            f"(the dense path) supports kv_lora_rank + qk_rope_head_dim = {CPU_MLA_DENSE_DECODE_HEAD_SIZE} "
            f"only, this model has {key_dim}; got dense_threshold={dense_threshold}. With "
            f"dense_threshold=0 every decode token takes the AsyncTLS path (exact when token_budget "
            f"covers the context)"
        )


def alias_backend_name() -> None:
    """Make `AttentionBackendEnum["ASYNCTLS"]` (any case, vLLM upper-cases) return `CUSTOM`."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member_map = AttentionBackendEnum._member_map_
    existing = member_map.get(BACKEND_NAME)
    if existing is None:
        member_map[BACKEND_NAME] = AttentionBackendEnum.CUSTOM
    elif existing is not AttentionBackendEnum.CUSTOM:
        raise RuntimeError(
            f"AttentionBackendEnum already has a member named {BACKEND_NAME} ({existing!r}); "
            "vllm_asynctls cannot alias it onto CUSTOM"
        )


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def custom_backend_path() -> str:
    """The class `CUSTOM` is bound to on this platform."""
    return GPU_BACKEND_PATH if _on_cuda() else GQA_BACKEND_PATH


def register_custom_override() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    path = custom_backend_path()
    current = AttentionBackendEnum.CUSTOM.get_path() if AttentionBackendEnum.CUSTOM.is_overridden() else None
    if current not in (None, *OUR_BACKEND_PATHS):
        logger.warning(
            "AttentionBackendEnum.CUSTOM was bound to %s by another plugin; vllm_asynctls rebinds it to %s",
            current,
            path,
        )
    register_backend(AttentionBackendEnum.CUSTOM, path)


def asynctls_selected(selected_backend) -> bool:
    """Whether `selected_backend` (an AttentionBackendEnum or None) means this plugin."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return (
        selected_backend is AttentionBackendEnum.CUSTOM
        and AttentionBackendEnum.CUSTOM.is_overridden()
        and AttentionBackendEnum.CUSTOM.get_path() in OUR_BACKEND_PATHS
    )


def unsupported_reason(attn_selector_config) -> str | None:
    """Why a layer cannot use the sparse path (None when it can). Such layers stay on the platform's
    dense backend; the whole-model cases (kv-cache dtype, sparse models) raise instead."""
    from vllm.v1.attention.backend import AttentionType

    if attn_selector_config.attn_type != AttentionType.DECODER:
        return f"attention type {attn_selector_config.attn_type} (only decoder self-attention decodes)"
    if attn_selector_config.has_sliding_window:
        return "sliding-window attention (its window already bounds the reads)"
    if attn_selector_config.has_sink:
        return "learned attention sinks"
    return None


# KV-cache dtype names the sparse kernels read: the model's own dtype, by default ('auto') or by name. That
# a name equals the model dtype is checked at selection (`kv_cache_dtype_reason`), where the dtype is known.
UNQUANTISED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
# fp8 KV caches with per-tensor scales (vLLM's `--kv-cache-dtype fp8`, e4m3 on CUDA), which the GPU
# backends' attention dequantises while it reads them; FlashAttention 3 and TRITON_MLA (their prefill) take
# the same names.
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def kv_cache_dtype_reason(kv_cache_dtype, model_dtype, on_gpu: bool, fp8: bool = False) -> str | None:
    """Why the sparse path cannot read a KV cache of `kv_cache_dtype` (None when it can): the model's own
    dtype, 'auto', or on GPU also by name ('bfloat16' for a bf16 model), which the GPU parents accept
    (vLLM's CPU attention knows no such names); with `fp8` (the GPU backends) also fp8."""
    import torch

    if kv_cache_dtype in (None, "auto") or (fp8 and kv_cache_dtype in FP8_KV_CACHE_DTYPES):
        return None
    allowed = ["'auto'"]
    own_name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(model_dtype) if on_gpu else None
    if own_name is not None:
        if kv_cache_dtype == own_name:
            return None
        allowed.append(repr(own_name))
    if fp8:
        allowed += [repr(name) for name in FP8_KV_CACHE_DTYPES]
    what = "K/V in the model dtype or fp8" if fp8 else "unquantised K/V in the model dtype"
    where = "" if on_gpu else " on the CPU platform"
    return (f"kv_cache_dtype must be {' or '.join(allowed)}{where} (the model's {model_dtype}: the sparse "
            f"kernels read {what}); got {kv_cache_dtype!r}")


def unsupported_impl_features(alibi_slopes, logits_soft_cap, sinks, sliding_window, attn_type, kv_cache_dtype,
                              kv_sharing_target_layer_name=None,
                              kv_cache_dtypes=UNQUANTISED_KV_CACHE_DTYPES) -> list[str]:
    """What an attention layer asks for that the sparse path lacks (empty when nothing); the impls of
    every backend raise NotImplementedError listing these. `kv_cache_dtypes`: the names the impl reads."""
    from vllm.v1.attention.backend import AttentionType

    problems = []
    if alibi_slopes is not None:
        problems.append("ALiBi slopes")
    if logits_soft_cap:
        problems.append(f"logits soft-capping ({logits_soft_cap})")
    if sinks is not None:
        problems.append("learned attention sinks")
    if sliding_window is not None:
        problems.append(f"sliding window ({sliding_window})")
    if attn_type != AttentionType.DECODER:
        problems.append(f"attention type {attn_type}")
    if kv_cache_dtype not in kv_cache_dtypes:
        problems.append(f"kv_cache_dtype {kv_cache_dtype!r} (allowed: {', '.join(map(repr, kv_cache_dtypes))})")
    if kv_sharing_target_layer_name is not None:
        problems.append(f"KV sharing with layer {kv_sharing_target_layer_name} (its index is never written)")
    return problems


class AsyncTLSGPUBackendTraits:
    """What both GPU backends (the FLASH_ATTN and the TRITON_MLA subclass) declare beyond their parent:
    the plugin's name and KV-cache dtype, no batch invariance (the sparse operator's split count depends
    on the batch size), no KV connectors (a connector would load blocks without writing their index),
    and no models with a trained sparse attention. Put it first among the bases. `fp8_kv_cache`: whether
    the backend's decode reads fp8 KV caches."""

    supported_kv_cache_dtypes = list(UNQUANTISED_KV_CACHE_DTYPES)
    fp8_kv_cache: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False  # the fp8 decode path takes one scale per tensor for q, k and v

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        reasons = list(super().validate_configuration(*args, **kwargs))
        if kwargs.get("use_sparse"):
            reasons.append("the model already uses a trained sparse attention; AsyncTLS applies to dense models")
        if kwargs.get("use_kv_connector"):
            reasons.append("KV connectors are not supported by asynctls on GPU (loaded blocks would miss the index)")
        dtype_reason = kv_cache_dtype_reason(kwargs.get("kv_cache_dtype"), kwargs.get("dtype"), on_gpu=True,
                                             fp8=cls.fp8_kv_cache)
        if dtype_reason is not None:
            reasons.append(dtype_reason)
        return reasons


def check_impl_features(*features, kv_cache_dtypes=UNQUANTISED_KV_CACHE_DTYPES) -> None:
    """Raise NotImplementedError naming every feature `unsupported_impl_features(*features)` lists (the
    impls of all backends call this before their parent's constructor)."""
    problems = unsupported_impl_features(*features, kv_cache_dtypes=kv_cache_dtypes)
    if problems:
        raise NotImplementedError(
            "--attention-backend asynctls does not support " + ", ".join(problems)
            + "; serve this model with the default attention backend"
        )


def check_cuda_engine(vllm_config, cfg, sparse) -> None:
    """Start-up checks of the GPU backend against the engine (ValueError / NotImplementedError naming
    the setting)."""
    if cfg.mode != "asynctls":
        raise ValueError(
            f"asynctls knob mode must be 'asynctls' on GPU (the 'block_only', 'exact_topk' and 'dense' "
            f"baselines run on the CPU platform); got {cfg.mode!r}"
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise NotImplementedError(
            "--attention-backend asynctls on GPU does not support speculative decoding (its multi-token "
            "verification queries would all take the dense path); drop --speculative-config"
        )
    if getattr(vllm_config.parallel_config, "enable_dbo", False):
        raise NotImplementedError("--attention-backend asynctls does not support dual-batch overlap (--enable-dbo)")
    from vllm.utils.torch_utils import is_quantized_kv_cache

    kv_dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto"))
    if is_quantized_kv_cache(kv_dtype) and sparse.index_bits == 16:
        raise ValueError(
            f"asynctls knob index_bits=16 scores tokens with the full keys, which a quantised KV cache holds "
            f"quantised; got index_bits=16 with --kv-cache-dtype {kv_dtype}. Use index_bits 4 or 8 (allowed: "
            f"4, 8, 16), or an unquantised KV cache"
        )
    dcp = getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1)
    if dcp > 1:
        raise NotImplementedError(
            f"--attention-backend asynctls does not support decode context parallelism; got "
            f"--decode-context-parallel-size {dcp}"
        )
    S = sparse.selection_block_size
    covers = sparse.num_blocks * S >= sparse.token_budget + 2 * S
    logger.info(
        "asynctls on GPU: every decode token runs the sparse operator; contexts up to %d tokens "
        "(token_budget + sink_tokens + local_tokens) are attended in full%s (dense_threshold=%d)",
        sparse.attended_tokens,
        "" if covers else " only if the coarse level keeps all their blocks: num_blocks * "
        "selection_block_size < token_budget + 2 * selection_block_size here, so some may not be",
        cfg.dense_threshold,
    )


def keep_mla_cache_write_unfused(vllm_config) -> None:
    """vLLM's fused MLA RoPE + latent-cache write replaces the layer's cache update with a kernel that
    never calls the backend's `do_kv_cache_update`, where the index is written: keep it off."""
    pass_config = getattr(vllm_config.compilation_config, "pass_config", None)
    if pass_config is not None and getattr(pass_config, "fuse_rope_kvcache_cat_mla", False):
        pass_config.fuse_rope_kvcache_cat_mla = False
        logger.info("asynctls: fuse_rope_kvcache_cat_mla turned off (the fused cache write would skip the index)")


def check_model_supported(attn_selector_config, on_gpu: bool = False, fp8: bool = False) -> None:
    """Raise at start-up for combinations the sparse kernels lack (`fp8`: the backend reads fp8 KV caches)."""
    if attn_selector_config.use_sparse:
        raise NotImplementedError(
            "--attention-backend asynctls: the model already uses a trained sparse attention "
            "(DeepSeek sparse attention / indexer); AsyncTLS applies to dense-attention models only"
        )
    reason = kv_cache_dtype_reason(attn_selector_config.kv_cache_dtype, attn_selector_config.dtype, on_gpu, fp8)
    if reason is not None:
        hint = (" (a checkpoint that declares an fp8 KV scheme turns 'auto' into fp8: name the model's dtype to "
                "keep the cache unquantised)" if on_gpu else "")
        raise NotImplementedError(f"--attention-backend asynctls: {reason}. Pass --kv-cache-dtype with an allowed "
                                  f"value{hint}")


def patch_cpu_platform() -> None:
    """Make the CPU platform honour `--attention-backend asynctls` (idempotent)."""
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform.get_attn_backend_cls, _PATCH_MARK, False):
        return
    original = CpuPlatform.__dict__["get_attn_backend_cls"].__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not asynctls_selected(selected_backend):
            return original(cls, selected_backend, attn_selector_config, num_heads)
        check_model_supported(attn_selector_config)
        reason = unsupported_reason(attn_selector_config)
        if reason is not None:
            logger.warning(
                "asynctls: layer with %s keeps the CPU platform's dense attention backend", reason
            )
            return original(cls, None, attn_selector_config, num_heads)
        path = MLA_BACKEND_PATH if attn_selector_config.use_mla else GQA_BACKEND_PATH
        logger.info("asynctls: using %s", path)
        return path

    setattr(get_attn_backend_cls, _PATCH_MARK, True)
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def cuda_attn_backend_selector(original):
    """`CudaPlatformBase.get_attn_backend_cls` wrapped: with asynctls selected, MLA layers get the GPU MLA
    backend (checked by its own `validate_configuration`); every other call goes to `original`."""

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not (asynctls_selected(selected_backend) and attn_selector_config.use_mla):
            return original(cls, selected_backend, attn_selector_config, num_heads)
        from vllm_asynctls.gpu_mla_backend import AsyncTLSTritonMLABackend

        check_model_supported(attn_selector_config, on_gpu=True, fp8=AsyncTLSTritonMLABackend.fp8_kv_cache)

        reasons = AsyncTLSTritonMLABackend.validate_configuration(
            device_capability=cls.get_device_capability(), **attn_selector_config._asdict())
        if reasons:
            raise ValueError(f"--attention-backend asynctls cannot serve this MLA model: {reasons}")
        logger.info("asynctls: using %s", GPU_MLA_BACKEND_PATH)
        return GPU_MLA_BACKEND_PATH

    setattr(get_attn_backend_cls, _PATCH_MARK, True)
    return get_attn_backend_cls


def patch_cuda_platform() -> None:
    """Route MLA layers to the GPU MLA backend when asynctls is selected on CUDA (idempotent)."""
    from vllm.platforms.cuda import CudaPlatformBase

    if getattr(CudaPlatformBase.get_attn_backend_cls, _PATCH_MARK, False):
        return
    original = CudaPlatformBase.__dict__["get_attn_backend_cls"].__func__
    CudaPlatformBase.get_attn_backend_cls = classmethod(cuda_attn_backend_selector(original))


def validate_vllm_config(vllm_config) -> None:
    """Raise ValueError naming the knob when `--additional-config '{"asynctls": ...}'` is invalid for
    this engine (a no-op unless asynctls was selected)."""
    if not asynctls_selected(vllm_config.attention_config.backend):
        return
    from vllm_asynctls.config import AsyncTLSConfig

    cfg = AsyncTLSConfig.from_vllm_config(vllm_config)
    if vllm_config.cache_config is not None and vllm_config.cache_config.block_size:
        cfg.check_cache_block_size(vllm_config.cache_config.block_size)
    model_config = vllm_config.model_config
    if model_config is not None:
        is_mla = bool(getattr(model_config, "use_mla", False))
        head_dim = model_config.get_head_size()
        sparse = cfg.sparse_config(head_dim=head_dim, is_mla=is_mla)
        cfg.check_index_calibration(vllm_config, head_dim, sparse.index_channels, is_mla)
        if _on_cuda():
            check_cuda_engine(vllm_config, cfg, sparse)
            if is_mla:
                keep_mla_cache_write_unfused(vllm_config)
        elif is_mla:
            check_cpu_mla_dense_threshold(head_dim, cfg.dense_threshold)
        if cfg.offload:
            if _on_cuda():
                raise NotImplementedError(
                    "asynctls knob offload=true runs on the CPU platform only in this version (the GPU "
                    "backend has no offload path yet); got offload=true on CUDA"
                )
            from vllm_asynctls.offload.connector import check_offload_config

            check_offload_config(vllm_config, cfg)  # the index is then sized by the host pool
        else:
            reserve_index_memory(vllm_config, cfg, head_dim, is_mla, on_cuda=_on_cuda())
    logger.info("asynctls: %s", cfg)


def rank_kv_heads(vllm_config, num_kv_heads: int) -> list[int]:
    """The model's kv heads this tensor-parallel rank's attention layers hold (`num_kv_heads` of them)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from vllm_asynctls.calibration import tensor_parallel_kv_heads

    heads = tensor_parallel_kv_heads(vllm_config.model_config.get_total_num_kv_heads(),
                                     get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    if len(heads) != num_kv_heads:
        raise RuntimeError(f"asynctls: this rank's layers hold {num_kv_heads} kv heads but the tensor-parallel split "
                           f"gives {heads}")
    return heads


def reserve_index_memory(vllm_config, cfg, head_dim: int, is_mla: bool, on_cuda: bool = False) -> None:
    """Count the index in vLLM's KV-cache memory. vLLM sizes the cache before any layer runs, so this
    is the one place to do it.

    - An explicit KV budget (`VLLM_CPU_KVCACHE_SPACE` / `--kv-cache-memory-bytes`) shrinks by the
      index's share, so K/V plus the index fit in what the user gave.
    - On GPU without one, vLLM sizes the cache from `gpu_memory_utilization`; the plugin lowers that
      fraction by the index's share (of the whole cap, an upper bound of the index, which only takes
      its share of the K/V part), so K/V plus the index stay inside the user's cap.
    - On CPU without one, vLLM sizes the cache from free memory and the index comes out of the
      remaining headroom.
    """
    from vllm.utils.torch_utils import get_kv_cache_torch_dtype

    cache_config = vllm_config.cache_config
    # Bytes per K/V channel as vLLM stores them (one for fp8: the index's share of the memory doubles).
    kv_dtype = get_kv_cache_torch_dtype(getattr(cache_config, "cache_dtype", "auto"), vllm_config.model_config.dtype)
    share = cfg.index_fraction(head_dim, is_mla, kv_dtype.itemsize)
    budget = getattr(cache_config, "kv_cache_memory_bytes", None)
    if not budget:
        if on_cuda:
            _fit_index_under_gpu_memory_utilization(cache_config, share)
        return
    if budget == getattr(cache_config, "_asynctls_kv_bytes", None):
        return  # already shrunk (the config check runs in every process the config reaches)
    cache_config.kv_cache_memory_bytes = int(budget * (1.0 - share))
    cache_config._asynctls_kv_bytes = cache_config.kv_cache_memory_bytes
    logger.info(
        "asynctls: index takes %.1f%% of the KV-cache budget; K/V get %.2f of %.2f GiB",
        100 * share, cache_config.kv_cache_memory_bytes / 2**30, budget / 2**30,
    )


def _fit_index_under_gpu_memory_utilization(cache_config, share: float) -> None:
    # The user's fraction is kept on the config (it travels with it to the engine core), so a second
    # config check lowers it from the same value instead of compounding.
    user = getattr(cache_config, "_asynctls_user_gpu_memory_utilization", None)
    if user is None:
        user = cache_config.gpu_memory_utilization
        cache_config._asynctls_user_gpu_memory_utilization = user
    cache_config.gpu_memory_utilization = user * (1.0 - share)
    logger.info(
        "asynctls on GPU: the index takes about %.1f%% of the KV-cache memory; gpu_memory_utilization "
        "%.3f -> %.3f so K/V plus the index stay inside it (or pass --kv-cache-memory-bytes: the plugin "
        "then takes the index out of that budget)", 100 * share, user, cache_config.gpu_memory_utilization,
    )


def patch_platform_config_check() -> None:
    """Validate the asynctls knobs in the current platform's `check_and_update_config` (idempotent)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls.check_and_update_config, _PATCH_MARK, False):
        return
    original = platform_cls.check_and_update_config.__func__  # bound classmethod, wherever defined

    def check_and_update_config(cls, vllm_config) -> None:
        original(cls, vllm_config)
        validate_vllm_config(vllm_config)

    setattr(check_and_update_config, _PATCH_MARK, True)
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def install() -> None:
    """Everything `register()` needs, in every process."""
    from vllm.platforms import current_platform

    alias_backend_name()
    register_custom_override()
    if current_platform.is_cuda():
        patch_cuda_platform()
    if current_platform.is_cpu():
        patch_cpu_platform()
        from vllm_asynctls import offload

        offload.register()  # the offload KV-cache spec (it also registers itself when unpickled)
    patch_platform_config_check()
