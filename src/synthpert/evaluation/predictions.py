"""Reading the predictions files of the model rows (one per row, cell line and shard)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from synthpert.core.io import PREDICTION_COLUMNS, read_parquet_columns
from synthpert.core.labels import CELLS
from synthpert.errors import CommandError
from synthpert.evaluation.answers import FAILED


def row_of(path: Path) -> str:
    """The model row of a predictions file: `.../{row}/{cell}.parquet` (baselines) or
    `.../{row}/{cell}/{shard}.parquet` (LLM rows, sharded; a cell id never is a number)."""
    return path.parent.parent.name if path.stem.isdigit() else path.parent.name


def load_predictions(paths: list[str | Path]) -> pl.DataFrame:
    """All predictions files, each with its `row` (see `row_of`)."""
    frames = []
    for path in map(Path, paths):
        frames.append(
            read_parquet_columns(path, PREDICTION_COLUMNS, "predictions file").with_columns(
                row=pl.lit(row_of(path)),
                label=pl.col("label").cast(pl.Int64),
                pred=pl.col("pred").cast(pl.Int64, strict=False),
                score_de=pl.col("score_de").cast(pl.Float64),
                score_up=pl.col("score_up").cast(pl.Float64),
            )
        )
    if not frames:
        raise CommandError("no predictions files given")
    return pl.concat(frames, how="vertical_relaxed")


def without_failures(frame: pl.DataFrame) -> pl.DataFrame:
    """The predictions that are answers: a failed request (status `failed`, written only
    under `evaluate.allow_failures`) is counted apart and never scored."""
    return frame.filter(pl.col("status") != FAILED)


def ordered_cells(frame: pl.DataFrame) -> list[str]:
    """The cell lines of `frame` in the paper's order (unknown ones last, sorted)."""
    present = frame["cell"].unique().to_list()
    return [c for c in CELLS if c in present] + sorted(c for c in present if c not in CELLS)
