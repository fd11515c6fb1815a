"""`synthpert evidence`: print the evidence block one question gets, so a person can read
what a model was shown (`evaluation.evidence`; docs/evidence.md).

The block is read from the split's evidence table (`results/evidence/{split}.parquet`,
rule `evidence_table`) when that table holds the question, else computed from the split's
training rows with the configuration's `evidence:` settings. Names are checked against the
split: an unknown split, cell line, perturbation or gene stops with the closest known names.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import polars as pl

from synthpert.core import paths
from synthpert.core.labels import display_cell
from synthpert.core.settings import for_step
from synthpert.errors import CommandError
from synthpert.evaluation.baselines import load_splits
from synthpert.evaluation.evidence import KEY, build, render_json
from synthpert.tools.question import DEFAULT_CONFIG, load_config, measured_genes, resolve_cell, suggest

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="default", help="the split (default: %(default)s; or e.g. rpe1_holdout)")
    parser.add_argument("--cell", required=True, help="cell line of the question (K562, RPE1, HepG2, Jurkat, or your own)")
    parser.add_argument("--pert", required=True, help="the knocked-down gene")
    parser.add_argument("--gene", required=True, help="the gene whose expression is asked about")
    parser.add_argument("--json", action="store_true", help="print the block's numbers as JSON (with its text)")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG,
        help="configuration whose evidence: settings compute a block the table lacks (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: %(default)s)")
    parser.add_argument("--table", type=Path, default=None, help="evidence table (default: RESULTS/evidence/SPLIT.parquet)")


def read_split(results: Path, split: str) -> pl.DataFrame:
    """The split's tuples with their roles; an unknown split names the known ones."""
    folder = results / "data" / "splits"
    path = folder / f"{split}.parquet"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.parquet"))
        if not known:
            raise CommandError(f"split {split!r} not found at {path}; run the data step first (snakemake {path})")
        raise CommandError(f"unknown split {split!r} (no {path}); known: {', '.join(known)}{suggest(split, known)}")
    return load_splits(path)


def known_name(kind: str, name: str, known: list[str], where: str) -> str:
    """The known spelling of `name` (any case), or an error with the closest known names."""
    by_upper = {k.upper(): k for k in known}
    if name.upper() not in by_upper:
        raise CommandError(f"unknown {kind} {name!r}: not {where}{suggest(name, known) or '; no similar name'}")
    return by_upper[name.upper()]


def block(args: argparse.Namespace) -> dict:
    """The evidence row of the question: from the table when it holds it, else computed."""
    splits = read_split(args.results, args.split)
    cell = resolve_cell(args.cell, splits)
    pert = known_name("perturbation", args.pert, splits["pert"].unique().sort().to_list(), f"perturbed in split {args.split}")
    gene = known_name("gene", args.gene, measured_genes(splits, cell), f"measured in {display_cell(cell)}")
    key = pl.DataFrame({"cell": [cell], "pert": [pert], "gene": [gene]})
    table = args.table or paths.evidence_table(args.split, args.results)
    if table.is_file():
        found = pl.read_parquet(table).join(key, on=list(KEY), how="semi")
        if found.height:
            log.info("evidence read from %s", table)
            return found.row(0, named=True)
        log.info("%s does not hold this question: computing it", table)
    try:
        config = load_config(args.config)
    except CommandError as err:
        raise CommandError(f"{err}\n(the evidence table {table} does not hold this question, so its settings are needed)") from None
    settings = for_step(config, "evidence")
    log.info("evidence computed from the training rows of split %s (evidence settings of %s)", args.split, args.config)
    return build(splits, key, settings).row(0, named=True)


def main(args: argparse.Namespace) -> None:
    row = block(args)
    print(render_json(row) if args.json else row["text"])
