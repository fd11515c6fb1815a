"""The three-class label convention shared by every step.

0 = not differentially expressed, 1 = downregulated, 2 = upregulated
(PerturbQA's DE label 0 -> 0; DE with direction 0 -> 1; DE with direction 1 -> 2).
"""

from __future__ import annotations

import math
import re

import polars as pl

from synthpert.errors import CommandError

# PerturbQA's cell lines, in the paper's order; any other id is welcome (data.cells).
CELLS = ("k562", "rpe1", "hepg2", "jurkat")
CELL_DISPLAY = {"k562": "K562", "rpe1": "RPE1", "hepg2": "HepG2", "jurkat": "Jurkat"}
# A cell line id: the schema's $defs.cell. It names files and folders, and never looks
# like a shard number.
CELL_ID = re.compile(r"[a-z][a-z0-9_]*")

NOT_DE, DOWN, UP = 0, 1, 2
CLASS_NAMES = {
    NOT_DE: "not differentially expressed",
    DOWN: "downregulated",
    UP: "upregulated",
}
NAME_TO_CLASS = {name: cls for cls, name in CLASS_NAMES.items()}
# Short column-friendly names, used in metric tables.
CLASS_KEYS = {NOT_DE: "not_de", DOWN: "down", UP: "up"}


def three_class(de: pl.Expr, direction: pl.Expr) -> pl.Expr:
    """PerturbQA's (DE label, direction label) columns as the three-class label."""
    return pl.when(de == 0).then(NOT_DE).when(direction == 1).then(UP).otherwise(DOWN).cast(pl.Int8)


def check_cells(cells: list[str]) -> None:
    """Every cell line id is safe as a file name (lower case, starting with a letter)."""
    bad = [c for c in cells if not CELL_ID.fullmatch(c)]
    if bad:
        raise CommandError(f"cell line id(s) {bad}: expected lower-case letters, digits and _, starting with a letter")


def display_cell(cell: str) -> str:
    return CELL_DISPLAY.get(cell, cell)


def class_probabilities(logprobs: dict[str, float]) -> dict[int, float]:
    """Softmax of answer options' log-probabilities (keyed by class name), by class."""
    top = max(logprobs.values())
    weights = {NAME_TO_CLASS[name]: math.exp(lp - top) for name, lp in logprobs.items()}
    total = sum(weights.values())
    return {cls: w / total for cls, w in weights.items()}
