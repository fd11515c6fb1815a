"""The one room that names a model and loads what names it. Every backend, the trainers
and the plan come here for:

* where a model's weights are (`resolve_local_model`: an `embedded:` model is its converted
  folder) and the API key of an endpoint (`api_key`);
* the precision `auto` (`resolve_dtype`: the same for every backend and for training);
* the tokenizer with the configured chat template (`load_tokenizer`);
* the identity a model's answers are keyed under in the request logs: a local model's
  weights, chat template, precision and adapter by content (`LocalModel`, `local_identity`),
  an API model's name and endpoint (`api_identity`); the ids older versions gave the same
  model (`legacy`); and every id a model can carry anywhere (`possible_identities`, for the
  plan, which may run where the model will not).

A backend calls `load_local` (or `api_identity`) once; nothing else names a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from synthpert.core.digest import folder_digest, text_digest
from synthpert.core.settings import Model
from synthpert.errors import CommandError

DTYPES = ("float32", "bfloat16", "float16")
OPENAI_URL = "https://api.openai.com/v1"  # the SDK's default endpoint: the same as none
DEFAULT_PORTS = {"http": 80, "https": 443}


def resolve_dtype(name: str) -> str:
    """The precision a local model computes in, the same for every backend and for
    training (it names the model in the request keys): `auto` is bfloat16 on a CUDA GPU of
    compute capability 8.0 or more (native bfloat16: A100, H100, L4 ...), else float32."""
    if name == "auto":
        import torch

        native_bf16 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
        return "bfloat16" if native_bf16 else "float32"
    if name not in DTYPES:
        raise CommandError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return name


def possible_dtypes(name: str) -> tuple[str, ...]:
    """Every precision `resolve_dtype(name)` can give on some machine (for `synthpert plan`,
    which may run where the model will not)."""
    return ("float32", "bfloat16") if name == "auto" else (name,)


def api_key(model: Model) -> str:
    """The API key from the environment variable the entry names ("" when it names none,
    for endpoints without authentication). The value never appears in a message."""
    name = model.api_key_env
    if name is None:
        return ""
    value = os.environ.get(name, "")
    if not value.strip():
        raise CommandError(
            f"the API key for model {model.model!r} is read from the environment variable "
            f"{name}, which is not set (or empty); export {name}=... first"
        )
    return value.strip()


def resolve_local_model(model: str) -> str:
    """The folder (or hub id) a local model loads from: an `embedded:` model is its
    converted folder, which must exist already (the embedded-model rule writes it)."""
    from synthpert.llm.embedded import is_embedded, local_path

    path = local_path(model)
    if is_embedded(model) and not (Path(path) / "config.json").exists():
        raise CommandError(
            f"the embedded model {model!r} is not converted yet ({path} is missing); run the "
            f"embedded-model rule first (synthpert embedded-model --out {path})"
        )
    return path


def check_adapter(adapter: str | os.PathLike | None) -> None:
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise CommandError(f"adapter folder {adapter} has no adapter_config.json (not a PEFT adapter)")


def load_tokenizer(model: Model, path: str):
    """The model's tokenizer at its revision, with the entry's `chat_template` file in place
    of its own (the template names the model); refused when it ends up without one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model.revision)
    except OSError as err:
        raise CommandError(f"cannot load the tokenizer of model {model.model!r} from {path}: {err}") from None
    if model.chat_template:
        template = Path(model.chat_template)
        if not template.is_file():
            raise CommandError(f"chat_template {template} of model {model.model!r} does not exist")
        tokenizer.chat_template = template.read_text()
    if not tokenizer.chat_template:
        raise CommandError(f"model {model.model!r} has no chat template; set chat_template to a Jinja file")
    return tokenizer


@dataclass(frozen=True)
class LocalModel:
    """A local model as a backend runs it: where its weights are, its tokenizer (with the
    chat template), the precision it computes in, its adapter, and the ids its answers are
    keyed under (`identity`, and `legacy`: those older versions gave it)."""

    path: str
    tokenizer: Any
    dtype: str
    adapter: str | None
    identity: str
    legacy: tuple[str, ...]


def load_local(model: Model, adapter: str | os.PathLike | None = None) -> LocalModel:
    """Resolve, check and name one `local`/`vllm` model entry (with an adapter or not)."""
    path = resolve_local_model(model.model)
    adapter = None if adapter is None else str(adapter)
    check_adapter(adapter)
    dtype = resolve_dtype(model.dtype)
    tokenizer = load_tokenizer(model, path)
    naming = (model.model, model.revision, str(tokenizer.chat_template), dtype, adapter)
    return LocalModel(path, tokenizer, dtype, adapter, local_identity(*naming), (local_identity(*naming, legacy=True),))


def possible_identities(model: Model, adapter: str | os.PathLike | None = None) -> set[str]:
    """Every id the answers of a `models:` entry (with an adapter) can carry in a request
    log, on any machine: an API model's id and its legacy ones; a local model's under each
    precision `auto` can resolve to, current and legacy."""
    if not model.local:
        return {api_identity(model), *legacy_api_identities(model)}
    template = str(load_tokenizer(model, resolve_local_model(model.model)).chat_template)
    return {
        local_identity(model.model, model.revision, template, dtype, adapter, legacy=old)
        for dtype in possible_dtypes(model.dtype)
        for old in (False, True)
    }


def hub_revision(model: str, revision: str | None) -> str:
    """`id@commit` of a Hugging Face model in the local cache (the commit its revision
    resolved to), else `id@revision` (`main` when none is given)."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, revision=revision, local_files_only=True)
        return f"{model}@{Path(folder).name}"
    except Exception:  # not cached (yet), or not a hub id: name the revision asked for
        return f"{model}@{revision or 'main'}"


def adapter_digest(folder: str | os.PathLike) -> str:
    """Digest of a PEFT adapter: its weights and its configuration, less the path of the
    base model it was trained from (the base is named on its own in the identity)."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    weights = folder_digest(folder, keep=lambda rel: rel.name.startswith("adapter_model."))
    return text_digest(json.dumps(config, sort_keys=True) + weights)


def local_identity(
    model: str,
    revision: str | None,
    chat_template: str,
    dtype: str,
    adapter: str | os.PathLike | None = None,
    legacy: bool = False,
) -> str:
    """The model id in the request keys of a local model: its weights by content (a
    folder's files, its JSON files by content less the version stamps `save_pretrained`
    writes, or a hub id with the commit it resolved to), the chat template that renders its
    prompts, the precision it computes in, and its adapter by content. So retrained weights
    never inherit old answers, the same weights answer from the same log lines wherever
    their folder lives, and a folder saved again by another `transformers` keeps its id.
    `legacy`: the id versions before that gave it (every file by its bytes)."""
    from synthpert.llm.embedded import is_embedded, local_path

    path = Path(local_path(model))
    if is_embedded(model) or path.is_dir():
        weights = f"sha256:{folder_digest(path, json_content=not legacy)}"
    else:
        weights = hub_revision(model, revision)
    parts = [f"local:{weights}", f"template:{text_digest(chat_template)[:16]}", f"dtype:{dtype}"]
    if adapter is not None:
        parts.append(f"adapter:{adapter_digest(adapter)}")
    return "|".join(parts)


def canonical_url(url: str | None) -> str | None:
    """An endpoint as one string however it is written: scheme and host in lower case, no
    default port, no credentials, no repeated or trailing slash; OpenAI's own is None."""
    if not url or not url.strip():
        return None
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != DEFAULT_PORTS.get(scheme):
        netloc += f":{parts.port}"
    path = "/".join(p for p in parts.path.split("/") if p)
    canonical = urlunsplit((scheme, netloc, f"/{path}" if path else "", parts.query, ""))
    return None if canonical == OPENAI_URL else canonical


def api_identity(model: Model) -> str:
    """The model id in the request keys of an API model: its name, and the endpoint when
    it is not OpenAI's own (the same name elsewhere may be other weights), written
    canonically (`canonical_url`)."""
    url = canonical_url(model.base_url)
    return model.model if url is None else f"{model.model}@{url}"


def legacy_api_identities(model: Model) -> tuple[str, ...]:
    """The id versions before `canonical_url` gave the model (the endpoint as configured)."""
    old = model.model if not model.base_url else f"{model.model}@{model.base_url}"
    return () if old == api_identity(model) else (old,)
