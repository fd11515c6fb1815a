"""Commands for people rather than rules: ask a model, screen a perturbation."""
