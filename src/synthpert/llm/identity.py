"""What names a model in the request keys: its weights, adapter, template and precision by
content, or an API model by its name and endpoint; and the one rule for precision `auto`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from synthpert.core.digest import folder_digest, text_digest
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


def api_identity(spec: dict) -> str:
    """The model id in the request keys of an API model: its name, and the endpoint when
    it is not OpenAI's own (the same name elsewhere may be other weights), written
    canonically (`canonical_url`)."""
    url = canonical_url(spec.get("base_url"))
    return spec["model"] if url is None else f"{spec['model']}@{url}"


def legacy_api_identities(spec: dict) -> tuple[str, ...]:
    """The id versions before `canonical_url` gave the model (the endpoint as configured)."""
    old = spec["model"] if not spec.get("base_url") else f"{spec['model']}@{spec['base_url']}"
    return () if old == api_identity(spec) else (old,)
