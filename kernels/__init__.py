"""Triton kernels shared by vllm_asynctls and trl_tip, each beside its plain-PyTorch reference.

Installed under the import name `asynctls_tip_kernels` (the folder is `kernels/` in the repository):
the top-level name `kernels` belongs to Hugging Face's `kernels` distribution, which transformers
probes for, so shipping a second `kernels` package would break both.
"""
