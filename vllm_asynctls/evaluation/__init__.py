"""Accuracy evaluation on a real model: SmolLM2-135M from a registry package (`real_model`), a
RULER-style synthetic long-context suite (`long_context_suite`) and attention-mass recall of the
sparse selections on the model's own keys (`recall`); random weights for benchmark engines loaded
with dummy weights (`random_weights`). Nothing heavy happens at import."""

__all__ = ["real_model", "long_context_suite", "recall", "random_weights"]
