"""Step 1 for a cell line of your own: a Perturb-seq screen (.h5ad) to PerturbQA's files.

Reads the screen (checked first: columns, counts layer, control cells, gene names, cells
per perturbation; see `derivation.screen_file`), tests every kept perturbation against
the control cells (`derivation.methods`: pseudobulk DESeq2 by default, or Wilcoxon),
corrects, thresholds and splits (`derivation.calls`), and writes the DE and direction
CSVs that `prepare` reads like PerturbQA's, the statistics beside them, and a summary.
Every output is written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import polars as pl
from tqdm import tqdm

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import atomic_path, write_csv, write_parquet
from synthpert.core.settings import Derive
from synthpert.derivation.calls import perturbqa_files, stats_table
from synthpert.derivation.methods import METHODS
from synthpert.derivation.screen_file import open_screen
from synthpert.errors import CommandError

log = logging.getLogger(__name__)


def derive(h5ad: str | Path, settings: Derive, threads: int = 1) -> tuple[pl.DataFrame, dict]:
    """The statistics table of a screen (`calls.STATS_COLUMNS`) and its summary."""
    started = time.monotonic()
    screen = open_screen(h5ad, settings)
    tested, results = METHODS[settings.method](screen, settings.min_mean_count, threads)
    if tested.size == 0:
        raise CommandError(f"{h5ad}: no gene has a mean count per cell >= min_mean_count = {settings.min_mean_count}")
    log.info("%s test of %d perturbations x %d genes", settings.method, len(screen.perts), tested.size)
    progress = tqdm(results, total=len(screen.perts), unit="perturbation", desc=settings.method, mininterval=10)
    stats = stats_table(progress, screen.genes[tested], screen.n_cells, settings)
    de = stats.filter(pl.col("de") == 1)
    summary = {
        "method": settings.method,
        "cells": int(screen.code.size),
        "control_cells": screen.n_cells[screen.control],
        "perturbations": len(screen.perts),
        "skipped_perturbations": len(screen.skipped),
        "skipped": dict(sorted(screen.skipped.items())),
        "genes_in_file": int(screen.genes.size),
        "genes_tested": int(tested.size),
        "tuples": stats.height,
        "de": de.height,
        "up": int((de["direction"] == 1).sum()),
        "down": int((de["direction"] == 0).sum()),
        "test_perturbations": int(stats.filter(pl.col("split") == "test")["pert"].n_unique()),
        "seconds": round(time.monotonic() - started, 1),
    }
    return stats, summary


def add_arguments(parser) -> None:
    parser.add_argument("--h5ad", required=True, type=Path, help="the screen (AnnData .h5ad, raw counts)")
    add_settings_arguments(parser, "derive")
    parser.add_argument("--threads", type=int, default=1, help="worker processes for the DESeq2 fits, one perturbation each")
    parser.add_argument("--de", required=True, type=Path, help="output: <cell>-de.csv (PerturbQA format)")
    parser.add_argument("--dir", required=True, type=Path, help="output: <cell>-dir.csv (PerturbQA format)")
    parser.add_argument("--stats", required=True, type=Path, help="output: statistics of every tuple (Parquet)")
    parser.add_argument("--summary", required=True, type=Path, help="output: counts of cells, perturbations, calls (JSON)")


def main(args) -> None:
    settings = Derive.from_cli(args.settings, args.run)
    stats, summary = derive(args.h5ad, settings, args.threads)
    de, direction = perturbqa_files(stats)
    write_parquet(stats, args.stats)
    write_csv(de, args.de)
    write_csv(direction, args.dir)
    with atomic_path(args.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s", json.dumps({k: v for k, v in summary.items() if k != "skipped"}))
