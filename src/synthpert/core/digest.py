"""Content digests of files and folders: what names a model's weights or an adapter in a
request key and in a rule's params, whatever path it lives at.

Hashing an 8B model (16 GB) takes a minute, and Snakemake builds the DAG (and so asks
for the digest) on every invocation and in every cluster job. Each file's digest is
therefore cached by (resolved path, size, modification time) in
`$XDG_CACHE_HOME/synthpert/digests.json` (or `SYNTHPERT_DIGEST_CACHE`): a file that is
rewritten gets a new modification time and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from synthpert.core.io import atomic_path

CHUNK = 1 << 20
_lock = threading.Lock()


def cache_path() -> Path:
    if os.environ.get("SYNTHPERT_DIGEST_CACHE"):
        return Path(os.environ["SYNTHPERT_DIGEST_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "synthpert" / "digests.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (cached by path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_path()
    with _lock:
        cached = _read_cache(cache_file).get(stamp)
    if cached:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        with _lock:
            cache = _read_cache(cache_file)
            cache[stamp] = digest
            with atomic_path(cache_file) as tmp:
                tmp.write_text(json.dumps(cache))
    except OSError:  # a read-only home still gets the digest, only slower next time
        pass
    return digest


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Keys that `save_pretrained` writes into a model's JSON files to say which library version
# (or which source path) wrote them: they name the writer, not the model.
WRITER_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})


def _without_writer(value):
    if isinstance(value, dict):
        return {k: _without_writer(v) for k, v in value.items() if k not in WRITER_KEYS}
    if isinstance(value, list):
        return [_without_writer(v) for v in value]
    return value


def json_content_digest(path: Path) -> str:
    """SHA-256 of a JSON file's content (keys sorted, no whitespace, `WRITER_KEYS` left out at
    any depth): the same configuration written by another library version, or laid out
    another way, has the same digest. Not JSON after all: the file's bytes."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return file_digest(path)
    return text_digest(json.dumps(_without_writer(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def folder_digest(
    folder: str | os.PathLike, keep: Callable[[Path], bool] = lambda p: True, json_content: bool = False
) -> str:
    """SHA-256 over the relative path and digest of every file of a folder that `keep`
    accepts (hidden files and folders and README.md never count: they do not change a
    model). Two folders with the same files have the same digest wherever they are. With
    `json_content`, `.json` files count by content (`json_content_digest`), so a model
    saved again by another `transformers` version keeps its digest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    entries = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) or rel.name == "README.md":
            continue
        if keep(rel):
            digest = json_content_digest(path) if json_content and path.suffix == ".json" else file_digest(path)
            entries.append(f"{rel.as_posix()}\0{digest}")
    return text_digest("\n".join(entries))
