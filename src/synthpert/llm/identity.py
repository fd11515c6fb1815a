"""What names a model in the request keys: its weights, adapter and template by content."""

from __future__ import annotations

import json
import os
from pathlib import Path

from synthpert.core.digest import folder_digest, text_digest


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
    model: str, revision: str | None, chat_template: str, dtype: str, adapter: str | os.PathLike | None = None
) -> str:
    """The model id in the request keys of a local model: its weights by content (a
    folder's digest, or a hub id with the commit it resolved to), the chat template that
    renders its prompts, the precision it computes in, and its adapter by content. So
    retrained weights never inherit old answers, and the same weights answer from the
    same log lines wherever their folder lives."""
    from synthpert.llm.embedded import is_embedded, local_path

    path = Path(local_path(model))
    weights = f"sha256:{folder_digest(path)}" if is_embedded(model) or path.is_dir() else hub_revision(model, revision)
    parts = [f"local:{weights}", f"template:{text_digest(chat_template)[:16]}", f"dtype:{dtype}"]
    if adapter is not None:
        parts.append(f"adapter:{adapter_digest(adapter)}")
    return "|".join(parts)


def api_identity(spec: dict) -> str:
    """The model id in the request keys of an API model: its name, and the endpoint when
    it is not OpenAI's own (the same name elsewhere may be other weights)."""
    return spec["model"] if not spec.get("base_url") else f"{spec['model']}@{spec['base_url']}"
