"""Obtain one PerturbQA file from `data.source` (HTTP(S) base URL or local folder) and
verify it against its pinned SHA-256.

The bytes are streamed into a temporary file beside the destination while hashed, and
renamed into place only once the checksum matches, so a wrong, truncated or missing
download never leaves a file behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tqdm import tqdm

from synthpert.core.io import atomic_path
from synthpert.errors import CommandError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Upstream: Genentech/PerturbQA, pinned commit, folder perturbqa/datasets/.
UPSTREAM = (
    "https://raw.githubusercontent.com/Genentech/PerturbQA/"
    "df2fe3a7802f2a46a43876b4f8674734aad3a30a/perturbqa/datasets"
)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stream_url(url: str, dest, name: str) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length", 0)) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                while chunk := resp.read(CHUNK):
                    dest.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise CommandError(f"{name}: HTTP {err.code} from {url}") from None
    except (urllib.error.URLError, OSError) as err:
        raise CommandError(f"{name}: download from {url} failed: {err}") from None
    if total is not None and received != total:
        raise CommandError(f"{name}: truncated download from {url}: got {received} of {total} bytes")


def _copy_local(path: Path, dest, name: str) -> None:
    if not path.is_file():
        raise CommandError(f"{name}: not found at {path} (data.source is a local folder)")
    with open(path, "rb") as src, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=name) as bar:
        while chunk := src.read(CHUNK):
            dest.write(chunk)
            bar.update(len(chunk))


def fetch(source: str, name: str, sha256: str, out: str | os.PathLike) -> None:
    """Copy or download `source/name` to `out`, verified against `sha256`."""
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as dest:
            if is_url(source):
                _stream_url(f"{source.rstrip('/')}/{name}", dest, name)
            else:
                _copy_local(Path(source) / name, dest, name)
        actual = sha256_file(tmp)
        if actual != sha256:
            raise CommandError(
                f"{name}: checksum mismatch (corrupt or truncated file from {source}): "
                f"expected sha256 {sha256}, got {actual}"
            )
    log.info("%s verified (sha256 %s)", name, sha256[:12])


def add_arguments(parser) -> None:
    parser.add_argument("--source", required=True, help="HTTP(S) base URL or local folder")
    parser.add_argument("--name", required=True, help="file name, e.g. k562-de.csv")
    parser.add_argument("--sha256", required=True, help="expected SHA-256 of the file")
    parser.add_argument("--out", required=True, type=Path)


def main(args) -> None:
    fetch(args.source, args.name, args.sha256, args.out)
