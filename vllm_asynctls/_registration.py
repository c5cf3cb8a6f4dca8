"""Registration of the asynctls attention backend with vLLM (filled in by the plugin issue)."""


def register_backend() -> None:
    """Register the backend with vLLM's attention registry."""
    return None
