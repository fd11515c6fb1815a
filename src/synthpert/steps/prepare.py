"""Step 1: the three-class PerturbQA table, the evaluation splits and table 5.

Reads each cell line's differential-expression file (`label` 1 = DE) and direction file
(over the DE pairs, `label` 1 = up), validates them, and joins them into one table with
the three-class label of `labels.py`. Nothing is silently relabelled: every violation
is an error naming the file and showing the first offending rows.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import polars as pl

from synthpert.core.io import write_csv, write_parquet
from synthpert.core.labels import check_cells, display_cell, three_class
from synthpert.core.splits import split_names
from synthpert.errors import CommandError

log = logging.getLogger(__name__)

COLUMNS = ("pert", "gene", "label", "split")
SPLITS = ("train", "test")
SHOW = 5  # offending rows shown in an error


def _fail(path: Path, problem: str, rows: pl.DataFrame) -> CommandError:
    with pl.Config(tbl_rows=SHOW, tbl_hide_dataframe_shape=True):
        shown = rows.head(SHOW)
    return CommandError(f"{path}: {problem} ({rows.height} rows); first rows:\n{shown}")


def read_labels(path: Path) -> pl.DataFrame:
    """Read one PerturbQA CSV and check its columns, labels, splits and uniqueness."""
    if not path.is_file():
        raise CommandError(f"{path}: file not found")
    try:
        header = pl.read_csv(path, n_rows=0).columns
    except pl.exceptions.PolarsError as err:
        raise CommandError(f"{path}: not a readable CSV: {err}") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CommandError(f"{path}: missing column(s) {missing}; expected columns {list(COLUMNS)}, found {header}")
    try:
        df = pl.read_csv(
            path,
            columns=list(COLUMNS),
            schema_overrides={"pert": pl.String, "gene": pl.String, "label": pl.Int64, "split": pl.String},
        )
    except pl.exceptions.PolarsError as err:
        raise CommandError(f"{path}: column 'label' must hold integers 0/1: {err}") from None
    nulls = df.filter(pl.any_horizontal(pl.all().is_null()))
    if nulls.height:
        raise _fail(path, "empty values", nulls)
    bad_label = df.filter(~pl.col("label").is_in([0, 1]))
    if bad_label.height:
        raise _fail(path, "labels outside {0, 1}", bad_label)
    bad_split = df.filter(~pl.col("split").is_in(SPLITS))
    if bad_split.height:
        raise _fail(path, f"split values outside {set(SPLITS)}", bad_split)
    dup = df.filter(pl.struct("pert", "gene").is_duplicated())
    if dup.height:
        raise _fail(path, "duplicate (pert, gene) pairs", dup.sort("pert", "gene"))
    return df.with_columns(pl.col("label").cast(pl.Int8))


def build_cell(cell: str, de_path: Path, dir_path: Path) -> pl.DataFrame:
    """Join one cell line's DE and direction files into the three-class table."""
    de = read_labels(de_path).rename({"label": "de"})
    direction = read_labels(dir_path).rename({"label": "direction", "split": "dir_split"})
    joined = de.join(direction, on=["pert", "gene"], how="full", coalesce=True)
    outside = joined.filter(pl.col("de").is_null() | ((pl.col("de") == 0) & pl.col("direction").is_not_null()))
    if outside.height:
        raise _fail(dir_path, f"direction rows outside the DE pairs of {de_path.name}", outside)
    undirected = joined.filter((pl.col("de") == 1) & pl.col("direction").is_null())
    if undirected.height:
        raise _fail(dir_path, f"DE pairs of {de_path.name} without a direction", undirected)
    split_clash = joined.filter(pl.col("dir_split").is_not_null() & (pl.col("dir_split") != pl.col("split")))
    if split_clash.height:
        raise _fail(dir_path, f"split differs from {de_path.name}", split_clash)
    label = three_class(pl.col("de"), pl.col("direction"))
    return joined.select(
        pl.lit(cell).alias("cell"), "pert", "gene", "de", "direction", label.alias("label"), "split"
    ).sort("pert", "gene")


def build_tuples(input_dir: Path, cells: list[str], cell_dirs: dict[str, Path] | None = None) -> pl.DataFrame:
    """Every cell line's table; its CSV pair is in `input_dir` unless `cell_dirs` names
    its own folder (a cell line derived from its own screen)."""
    check_cells(cells)
    cell_dirs = cell_dirs or {}
    stray = sorted(set(cell_dirs) - set(cells))
    if stray:
        raise CommandError(f"--cell-dir names cell line(s) {stray} not in --cells {cells}")
    folders = {c: cell_dirs.get(c, input_dir) for c in cells}
    frames = [build_cell(c, folders[c] / f"{c}-de.csv", folders[c] / f"{c}-dir.csv") for c in cells]
    return pl.concat(frames)


def make_split(tuples: pl.DataFrame, name: str) -> pl.DataFrame:
    """`default`: PerturbQA's own train/test; `<cell>_holdout`: that cell is the test set,
    every row of the other cells is training data."""
    if name == "default":
        role = pl.col("split")
    elif name.endswith("_holdout"):
        cell = name.removesuffix("_holdout")
        if cell not in tuples["cell"].unique().to_list():
            raise CommandError(f"hold-out cell line {cell!r} is not among the prepared cells")
        role = pl.when(pl.col("cell") == cell).then(pl.lit("test")).otherwise(pl.lit("train"))
    else:
        raise CommandError(f"unknown split {name!r}; expected 'default' or '<cell>_holdout'")
    return tuples.with_columns(role.alias("role"))


def table5(tuples: pl.DataFrame) -> pl.DataFrame:
    """Dataset statistics (paper's Appendix table 5): tuples per task and cell line."""
    counts = tuples.group_by("cell").agg(
        pl.col("direction").is_not_null().sum().alias("Direction of change"),
        pl.len().alias("Differential expression"),
    )
    cells = tuples["cell"].unique(maintain_order=True).to_list()
    rows = []
    for task in ("Direction of change", "Differential expression"):
        per_cell = dict(zip(counts["cell"], counts[task], strict=True))
        row = {"task": task} | {display_cell(c): int(per_cell[c]) for c in cells}
        row["Total"] = sum(int(per_cell[c]) for c in cells)
        rows.append(row)
    return pl.DataFrame(rows)


def add_arguments(parser) -> None:
    parser.add_argument("--input-dir", required=True, type=Path, help="folder with the verified CSVs")
    parser.add_argument("--cells", nargs="+", required=True, help="cell lines to read")
    parser.add_argument(
        "--cell-dir", nargs="*", default=[], type=_cell_dir, metavar="CELL=DIR",
        help="a cell line whose CSV pair is in its own folder (derived from its screen), not in --input-dir",
    )
    parser.add_argument("--holdout", nargs="*", default=[], help="cell lines to hold out whole")
    parser.add_argument("--tuples", required=True, type=Path, help="output: three-class table (Parquet)")
    parser.add_argument("--splits-dir", required=True, type=Path, help="output folder: <split>.parquet")
    parser.add_argument("--table5", required=True, type=Path, help="output: dataset statistics (CSV)")


def _cell_dir(text: str) -> tuple[str, Path]:
    cell, sep, folder = text.partition("=")
    if not sep or not cell or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CELL=DIR")
    return cell, Path(folder)


def main(args) -> None:
    tuples = build_tuples(args.input_dir, args.cells, dict(args.cell_dir))
    splits = {name: make_split(tuples, name) for name in split_names(args.holdout)}
    stats = table5(tuples)
    write_parquet(tuples, args.tuples)
    for name, df in splits.items():
        write_parquet(df, args.splits_dir / f"{name}.parquet")
    write_csv(stats, args.table5)
    log.info("%d tuples, splits %s\n%s", tuples.height, list(splits), stats)
