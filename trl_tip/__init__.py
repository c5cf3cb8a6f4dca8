"""TIP for TRL: token-importance selection for on-policy distillation."""
