"""The three-class label convention shared by every step.

0 = not differentially expressed, 1 = downregulated, 2 = upregulated
(PerturbQA's DE label 0 -> 0; DE with direction 0 -> 1; DE with direction 1 -> 2).
"""

from __future__ import annotations

import math

import polars as pl

CELLS = ("k562", "rpe1", "hepg2", "jurkat")
CELL_DISPLAY = {"k562": "K562", "rpe1": "RPE1", "hepg2": "HepG2", "jurkat": "Jurkat"}

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


def display_cell(cell: str) -> str:
    return CELL_DISPLAY.get(cell, cell)


def class_probabilities(logprobs: dict[str, float]) -> dict[int, float]:
    """Softmax of answer options' log-probabilities (keyed by class name), by class."""
    top = max(logprobs.values())
    weights = {NAME_TO_CLASS[name]: math.exp(lp - top) for name, lp in logprobs.items()}
    total = sum(weights.values())
    return {cls: w / total for cls, w in weights.items()}
