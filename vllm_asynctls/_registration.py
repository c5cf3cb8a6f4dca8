"""Registration of the asynctls attention backend with vLLM (the details live in `_vllm_compat`)."""


def register_backend() -> None:
    """Alias `ASYNCTLS` onto `AttentionBackendEnum.CUSTOM`, bind CUSTOM to our backend and make the CPU
    platform honour it. Called from the `vllm.general_plugins` entry point in every vLLM process."""
    from vllm_asynctls import _vllm_compat

    _vllm_compat.install()
