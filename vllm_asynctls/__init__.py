"""AsyncTLS for vLLM: two-level sparse attention for long-context decode, as a vLLM plugin.

`register()` is the `vllm.general_plugins` entry point; vLLM calls it in every process it starts.
Nothing heavy happens at import.
"""

__all__ = ["register"]


def register() -> None:
    """vLLM plugin entry point: make `--attention-backend asynctls` select this backend."""
    from vllm_asynctls._registration import register_backend

    register_backend()
