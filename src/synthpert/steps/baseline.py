"""`synthpert baseline`: the predictions of a row computed without a language model
(the algorithms are in `evaluation.baselines`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import write_parquet
from synthpert.core.rows import BASELINE_ROWS
from synthpert.core.settings import Baseline
from synthpert.errors import CommandError
from synthpert.evaluation.baselines import load_questions, load_splits, predict

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--row", required=True, choices=BASELINE_ROWS, help="which baseline row")
    parser.add_argument("--cell", required=True, help="the cell line whose questions to answer")
    parser.add_argument(
        "--splits-file", required=True, type=Path, help="results/data/splits/{split}.parquet"
    )
    parser.add_argument(
        "--questions", required=True, type=Path, help="results/eval/{split}/questions.parquet"
    )
    add_settings_arguments(parser, "baseline")
    parser.add_argument(
        "--out", required=True, type=Path, help="results/predictions/{split}/{row}/{cell}.parquet"
    )


def main(args: argparse.Namespace) -> None:
    splits = load_splits(args.splits_file)
    questions = load_questions(args.questions)
    settings = Baseline.from_cli(args.settings, args.run)
    if args.row == "knn" and settings.knn_k is None:
        raise CommandError("the knn row needs its number of neighbours: --settings '{\"knn_k\": K}'")
    frame = predict(args.row, splits, questions, args.cell, settings.knn_k)
    write_parquet(frame, args.out)
    log.info("%s %s: %d prediction rows -> %s", args.row, args.cell, frame.height, args.out)
