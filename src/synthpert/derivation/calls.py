"""From test statistics to PerturbQA's labels: multiple-testing correction within each
perturbation, the FDR threshold, the direction from the sign of the log fold change,
and a seeded train/test split by perturbation.

A tuple (pert, gene) is differentially expressed when its adjusted p is below `fdr`;
then it is up when its log2 fold change is positive, else down. A gene with no p-value
(all zero in the compared cells, or a DESeq2 Cook's outlier) is not called DE. The pair
of a perturbation with its own target gene is left out: it measures the knockdown
itself, not an effect on another gene (PerturbQA has no such pair either).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl
from scipy.stats import false_discovery_control

from synthpert.core.labels import three_class
from synthpert.core.settings import Derive

CORRECTIONS = {"benjamini-hochberg": "bh", "benjamini-yekutieli": "by"}
STATS_COLUMNS = ("pert", "gene", "n_cells", "log2fc", "pvalue", "padj", "de", "direction", "label", "split")


def adjust(pvalue: np.ndarray, correction: str) -> np.ndarray:
    """Adjusted p-values over the genes that have one (NaN stays NaN)."""
    padj = np.full(pvalue.shape, np.nan)
    tested = ~np.isnan(pvalue)
    if tested.any():
        padj[tested] = false_discovery_control(pvalue[tested], method=CORRECTIONS[correction])
    return padj


def split_perturbations(perts: Iterable[str], test_fraction: float, seed: int) -> dict[str, str]:
    """A seeded train/test split by perturbation: round(test_fraction x n) of them test."""
    perts = sorted(perts)
    n_test = round(len(perts) * test_fraction)
    test = set(np.random.default_rng(seed).choice(perts, size=n_test, replace=False).tolist()) if n_test else set()
    return {p: "test" if p in test else "train" for p in perts}


def stats_table(
    results: Iterable[tuple[str, np.ndarray, np.ndarray]], genes: np.ndarray, n_cells: dict[str, int], s: Derive
) -> pl.DataFrame:
    """One row per (perturbation, tested gene): statistics, call, label and split."""
    frames = [
        pl.DataFrame(
            {"pert": pert, "gene": genes, "n_cells": n_cells[pert], "log2fc": lfc, "pvalue": p, "padj": adjust(p, s.correction)},
            schema={"pert": pl.String, "gene": pl.String, "n_cells": pl.Int64, "log2fc": pl.Float64, "pvalue": pl.Float64, "padj": pl.Float64},
        )
        for pert, lfc, p in results
    ]
    stats = pl.concat(frames).with_columns(pl.col("log2fc", "pvalue", "padj").fill_nan(None))
    split = split_perturbations(stats["pert"].unique().to_list(), s.test_fraction, s.seed)
    de = (pl.col("padj") < s.fdr).fill_null(False).cast(pl.Int8)
    return (
        stats.filter(pl.col("pert") != pl.col("gene"))
        .with_columns(de.alias("de"))
        .with_columns(
            pl.when(pl.col("de") == 1).then((pl.col("log2fc") > 0).cast(pl.Int8)).alias("direction"),
            pl.col("pert").replace_strict(split).alias("split"),
        )
        .with_columns(three_class(pl.col("de"), pl.col("direction")).alias("label"))
        .select(STATS_COLUMNS)
        .sort("pert", "gene")
    )


def perturbqa_files(stats: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """PerturbQA's two files: DE (`label` 1 = DE) over every tuple, direction (`label` 1 =
    up, 0 = down) over the DE tuples; both with the split."""
    de = stats.select("pert", "gene", pl.col("de").alias("label"), "split")
    direction = stats.filter(pl.col("de") == 1).select("pert", "gene", pl.col("direction").alias("label"), "split")
    return de, direction
