"""Talking to language models: the request log, model identities, the backends, the embedded model."""
