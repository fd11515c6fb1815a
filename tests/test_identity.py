"""What names a model in the request keys: its weights by content, never its path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from synthpert.core.digest import folder_digest
from synthpert.llm.identity import local_identity
from synthpert.llm.requests import Request

REQUEST = Request(messages=(("user", "Does knocking down MYC change TP53?"),), max_new_tokens=8)
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def make_model(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "README.md").write_text(f"a model card that names {folder}")
    return folder


def make_adapter(folder: Path, weights: bytes, base: str = "resources/models/base") -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def key(model: Path, adapter: Path | None = None, template: str = TEMPLATE, dtype: str = "float32") -> str:
    return REQUEST.key(local_identity(str(model), None, template, dtype, adapter))


def test_retrained_adapter_at_the_same_path_gets_new_keys(tmp_path):
    base = make_model(tmp_path / "base", b"base weights")
    adapter = make_adapter(tmp_path / "results" / "adapter", b"weights after training run 1")
    first = key(base, adapter)
    make_adapter(adapter, b"weights after training run 2 (a new learning rate)")
    assert key(base, adapter) != first


def test_the_same_weights_elsewhere_get_the_same_keys(tmp_path):
    base = make_model(tmp_path / "base", b"base weights")
    here = make_adapter(tmp_path / "a" / "adapter", b"adapter weights")
    there = make_adapter(tmp_path / "b" / "copied", b"adapter weights", base=str(base.resolve()))
    assert key(base, here) == key(base, there)  # the recorded base path is not the adapter's identity
    moved_base = tmp_path / "elsewhere" / "base"
    shutil.copytree(base, moved_base)
    (moved_base / "README.md").write_text("another card")
    assert key(moved_base, here) == key(base, here)
    assert key(base) != key(base, here)  # a base model never answers for its fine-tuned variant


def test_base_weights_template_and_precision_name_the_answers(tmp_path):
    base = make_model(tmp_path / "base", b"base weights")
    first = key(base)
    assert key(base, template=TEMPLATE + " ") != first
    assert key(base, dtype="bfloat16") != first
    weights = base / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"other weights")  # rewritten in place, same size class, new mtime
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key(base) != first


def test_folder_digest_is_cached_and_sees_changes(tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    monkeypatch.setenv("SYNTHPERT_DIGEST_CACHE", str(cache))
    model = make_model(tmp_path / "m", b"w" * 1000)
    first = folder_digest(model)
    assert cache.exists() and folder_digest(model) == first
    (model / "model.safetensors").write_bytes(b"v" * 1000)
    os.utime(model / "model.safetensors", ns=(0, 10**18))
    assert folder_digest(model) != first
