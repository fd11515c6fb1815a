"""What names a model in the request keys: its weights by content, never its path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from synthpert.core.digest import folder_digest, text_digest
from synthpert.llm.identity import OPENAI_URL, api_identity, canonical_url, local_identity
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


def test_a_model_saved_again_by_another_transformers_keeps_its_keys(tmp_path, embedded_model):
    """The embedded model's id names its weights, tokenizer and template, not the version
    stamp `save_pretrained` writes into config.json and generation_config.json (nor their
    layout): another `transformers` gives the same keys, other weights do not."""
    copy = tmp_path / "model"
    shutil.copytree(embedded_model, copy)
    first = key(copy)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((copy / name).read_text())
        assert "transformers_version" in config
        config["transformers_version"] = "99.0.0.dev0"
        (copy / name).write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))
    assert key(copy) == first
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 2  # a setting that changes the model
    (copy / "config.json").write_text(json.dumps(config))
    assert key(copy) != first


def test_ids_of_earlier_versions_are_still_known(tmp_path):
    base = make_model(tmp_path / "base", b"base weights")
    legacy = local_identity(str(base), None, TEMPLATE, "float32", legacy=True)
    assert legacy != local_identity(str(base), None, TEMPLATE, "float32")
    assert legacy == f"local:sha256:{folder_digest(base)}|template:{text_digest(TEMPLATE)[:16]}|dtype:float32"


def test_equal_numbers_and_endpoints_written_differently_are_one_key():
    messages = (("user", "q"),)
    canonical = Request(messages=messages, max_new_tokens=64, temperature=0.0, top_p=1.0)
    assert Request(messages=messages, max_new_tokens=64.0, temperature=0, top_p=1).key("m") == canonical.key("m")
    assert Request(messages=messages, temperature=0.7).key("m") != Request(messages=messages, temperature=0.75).key("m")
    with pytest.raises(ValueError, match="whole number"):
        Request(messages=messages, max_new_tokens=64.5)
    ids = {api_identity({"model": "m", "base_url": url}) for url in
           ("http://Host:8000/v1", "http://host:8000/v1/", "http://host:8000//v1", " http://host:8000/v1 ")}  # fmt: skip
    assert ids == {"m@http://host:8000/v1"}
    assert {api_identity({"model": "m", "base_url": u}) for u in (None, "", OPENAI_URL, OPENAI_URL + "/",
                                                                  "https://API.openai.com:443/v1")} == {"m"}  # fmt: skip
    assert canonical_url("https://user:secret@host/v1") == "https://host/v1"  # no credentials in a key or a log


def test_precision_auto_is_one_rule(monkeypatch):
    import torch

    from synthpert.llm.identity import resolve_dtype
    from synthpert.llm.training import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 0), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        # a V100 (7.0) emulates bfloat16; the rule wants it native, for training and every backend alike
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert resolve_dtype("auto") == expected
        assert precision("auto")[1] == expected
