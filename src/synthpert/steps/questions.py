"""The held-out questions of one split: its test rows, or a seeded sample stratified by
class within each cell line, so every model row answers exactly the same questions."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import write_parquet
from synthpert.core.sampling import sample_size, stratified
from synthpert.core.settings import Questions, Sample
from synthpert.errors import CommandError
from synthpert.evaluation.answers import qid_expr

log = logging.getLogger(__name__)


def select_questions(split_df: pl.DataFrame, sample: Sample) -> pl.DataFrame:
    test = split_df.filter(pl.col("role") == "test")
    if test.height == 0:
        raise CommandError("the split has no test rows")
    parts = []
    for cell in sorted(test["cell"].unique().to_list()):
        rows = test.filter(pl.col("cell") == cell)
        parts.append(stratified(rows, "label", sample_size(rows.height, sample), sample.seed))
    return (
        pl.concat(parts)
        .with_columns(qid_expr().alias("qid"))
        .select("qid", "cell", "pert", "gene", "de", "direction", "label")
        .sort("cell", "pert", "gene")
    )


def add_arguments(parser) -> None:
    parser.add_argument("--split-file", required=True, type=Path)
    add_settings_arguments(parser, "questions")
    parser.add_argument("--out", required=True, type=Path)


def main(args) -> None:
    settings = Questions.from_cli(args.settings, args.run)
    questions = select_questions(pl.read_parquet(args.split_file), settings.sample)
    write_parquet(questions, args.out)
    counts = questions.group_by("cell", "label").len().sort("cell", "label")
    log.info("%d questions\n%s", questions.height, counts)
