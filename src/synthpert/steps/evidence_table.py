"""`synthpert evidence-table`: the evidence block of every question of a split, built once
from the split's training rows (the algorithm is `evaluation.evidence`), so the jobs that
show it to a model read it rather than recompute it."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import polars as pl

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import read_parquet_columns, write_parquet
from synthpert.core.settings import Evidence
from synthpert.evaluation.baselines import load_splits
from synthpert.evaluation.evidence import KEY, build

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--splits-file", required=True, type=Path, help="results/data/splits/{split}.parquet"
    )
    parser.add_argument(
        "--questions",
        required=True,
        nargs="+",
        type=Path,
        help="Parquet files of the tuples to describe (columns cell, pert, gene): "
        "results/eval/{split}/questions.parquet, and any training tuples to prompt with",
    )
    add_settings_arguments(parser, "evidence")
    parser.add_argument("--out", required=True, type=Path, help="results/evidence/{split}.parquet")


def main(args: argparse.Namespace) -> None:
    settings = Evidence.from_cli(args.settings, args.run)
    start = time.perf_counter()
    splits = load_splits(args.splits_file)
    tuples = pl.concat([read_parquet_columns(path, KEY, "tuples file") for path in args.questions])
    table = build(splits, tuples, settings)
    write_parquet(table, args.out)
    log.info(
        "%d evidence blocks (%d with a neighbour that measured the gene) in %.1f s -> %s",
        table.height,
        table.filter(pl.col("nn_measured") > 0).height if settings.neighbours else 0,
        time.perf_counter() - start,
        args.out,
    )
