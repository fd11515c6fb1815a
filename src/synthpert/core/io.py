"""Write outputs atomically: a step either leaves a complete file or none."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl

# Columns every predictions file has (model rows add more: see evaluate.PREDICTION_SCHEMA).
PREDICTION_COLUMNS = (
    "qid", "cell", "pert", "gene", "label", "task", "raw_text", "pred", "status",
    "score_de", "score_up", "score_source",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask like any file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_parquet(df: pl.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def write_csv(df: pl.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.write_csv(tmp)


def read_parquet_columns(path: str | os.PathLike, columns: tuple[str, ...], what: str) -> pl.DataFrame:
    """Read `columns` of a step's Parquet file, naming the file and what is missing."""
    from synthpert.errors import CommandError

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{what} not found: {path}")
    schema = pl.read_parquet_schema(path)
    missing = [c for c in columns if c not in schema]
    if missing:
        raise CommandError(f"{what} {path} lacks columns {missing}; expected {list(columns)}")
    return pl.read_parquet(path, columns=list(columns))
