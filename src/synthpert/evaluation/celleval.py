"""Predicted and real screens as `cell-eval` DE tables, and `cell-eval`'s DE metrics on them.

The Arc Institute's `cell-eval` (the Virtual Cell Challenge's scorer) compares a predicted and
a real differential-expression table per perturbation. A table has one line per
(perturbation, gene): `target, feature, log2_fold_change, abs_log2_fold_change, p_value, fdr`
(`cell-eval` reads `target, feature, log2_fold_change, p_value, fdr` and derives the absolute
value when it is missing; we write it, see below).

A model's answers are not a statistical test, and their table says so only through this
mapping (documented in the README, "Scoring screens with cell-eval"):

- `fdr` = `p_value` = 1 - P(DE): a gene is "significant" (`fdr` < 0.05) when the model gives a
  change more than 95%. These are NOT p-values: nothing was tested, they only carry the
  model's ranking into `cell-eval`'s thresholds and ROC/PR curves (-log10 fdr is monotone in
  P(DE)).
- `abs_log2_fold_change` = P(DE) (the order of `cell-eval`'s top-N overlaps; given, so
  `cell-eval` does not derive it from the next column), and `log2_fold_change` = the
  predicted direction: P(up) - P(down) (a screen); P(up) - 0.5 from the direction question
  where it was asked (an evaluation row: PerturbQA asks it of the measured DE tuples), else
  the three-class answer (up +1, down -1, other 0). Neither is a fold change: `cell-eval`
  reads the sign (direction match) and the order (Spearman) of `log2_fold_change` only on the
  real significant genes, and the order of `abs_log2_fold_change`.

The real side comes from PerturbQA's labels (`fdr` = `p_value` = 0 for a DE tuple, 1
otherwise; `log2_fold_change` +1 up, -1 down, 0 not DE) or from `derive`'s `stats.parquet`
(the screen's own log2 fold changes, raw and adjusted p-values).

`cell-eval` and its dependencies (scanpy, pdex, numba) are imported only by the functions
that need them: `pip install 'synthpert[celleval]'`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from synthpert.core.labels import DOWN, NOT_DE, UP
from synthpert.errors import CommandError

DE_COLUMNS = ("target", "feature", "log2_fold_change", "abs_log2_fold_change", "p_value", "fdr")
SIGNIFICANT = 0.05  # cell-eval's FDR threshold


def predicted_table(frame: pl.DataFrame, p_de: str = "p_de", direction: str = "direction") -> pl.DataFrame:
    """A model's answers (`pert, gene`, P(DE) in column `p_de`, a signed direction in
    `direction`) as a `cell-eval` DE table (the module's mapping)."""
    _check_columns(frame, ("pert", "gene", p_de, direction), "predictions")
    p = pl.col(p_de).cast(pl.Float64).clip(0.0, 1.0)
    return _ordered(
        frame.select(
            target=pl.col("pert"),
            feature=pl.col("gene"),
            log2_fold_change=pl.col(direction).cast(pl.Float64),
            abs_log2_fold_change=p,
            p_value=1.0 - p,
            fdr=1.0 - p,
        )
    )


def real_from_labels(frame: pl.DataFrame) -> pl.DataFrame:
    """PerturbQA's three-class labels (`pert, gene, label`) as the real DE table."""
    _check_columns(frame, ("pert", "gene", "label"), "labels")
    label = pl.col("label").cast(pl.Int64)
    change = pl.when(label == UP).then(1.0).when(label == DOWN).then(-1.0).otherwise(0.0)
    significant = pl.when(label == NOT_DE).then(1.0).otherwise(0.0)
    return _ordered(
        frame.select(
            target=pl.col("pert"),
            feature=pl.col("gene"),
            log2_fold_change=change,
            abs_log2_fold_change=change.abs(),
            p_value=significant,
            fdr=significant,
        )
    )


def real_from_stats(stats: pl.DataFrame) -> pl.DataFrame:
    """`derive`'s statistics (`pert, gene, log2fc, pvalue, padj`) as the real DE table; an
    untested gene (no p-value) counts as not significant (p = 1)."""
    _check_columns(stats, ("pert", "gene", "log2fc", "pvalue", "padj"), "derive statistics")
    lfc = pl.col("log2fc").cast(pl.Float64).fill_nan(None).fill_null(0.0)
    return _ordered(
        stats.select(
            target=pl.col("pert"),
            feature=pl.col("gene"),
            log2_fold_change=lfc,
            abs_log2_fold_change=lfc.abs(),
            p_value=pl.col("pvalue").cast(pl.Float64).fill_nan(None).fill_null(1.0),
            fdr=pl.col("padj").cast(pl.Float64).fill_nan(None).fill_null(1.0),
        )
    )


def evaluation_answers(preds: pl.DataFrame) -> pl.DataFrame:
    """One evaluation row's predictions of one cell line (both tasks) as `pert, gene, label,
    p_de, direction`: P(DE) = the `de3` answer's `score_de`; the direction = the direction
    question's `score_up` - 0.5 where it was asked, else the three-class answer's sign."""
    de3 = preds.filter(pl.col("task") == "de3")
    asked = preds.filter(pl.col("task") == "dir").select("qid", up=pl.col("score_up"))
    answer = pl.when(pl.col("pred") == UP).then(1.0).when(pl.col("pred") == DOWN).then(-1.0).otherwise(0.0)
    return (
        de3.join(asked, on="qid", how="left")
        .with_columns(
            p_de=pl.col("score_de"),
            direction=pl.when(pl.col("up").is_not_null()).then(pl.col("up") - 0.5).otherwise(answer),
        )
        .select("pert", "gene", "label", "p_de", "direction")
    )


def validate(table: pl.DataFrame, name: str) -> None:
    """`cell-eval`'s own check of a DE table (its `DEResults`: the required columns, numeric
    values), plus what it assumes without checking: one line per (target, feature), no
    missing values."""
    from cell_eval import DEResults

    _check_columns(table, DE_COLUMNS, f"{name} DE table")
    if table.select("target", "feature").is_duplicated().any():
        raise CommandError(f"{name} DE table repeats a (target, feature)")
    if table.select(pl.any_horizontal(pl.all().is_null()).any()).item():
        raise CommandError(f"{name} DE table has missing values")
    try:
        DEResults(table, name=name)
    except ValueError as error:
        raise CommandError(f"{name} DE table fails cell-eval's check: {error}") from error


def score(real: pl.DataFrame, pred: pl.DataFrame) -> pl.DataFrame:
    """`cell-eval`'s DE metrics (profile `de`: overlap and precision at N, direction match,
    Spearman of the fold changes, recall of the significant genes, ROC-AUC and PR-AUC of the
    real significant genes by -log10 fdr, significant counts), one line per perturbation.

    Both tables must cover the same (target, feature) pairs: the real side decides which genes
    were measured, so a predicted gene without a measurement is dropped first."""
    from cell_eval import MetricPipeline, initialize_de_comparison

    validate(real, "real")
    validate(pred, "predicted")
    pred = pred.join(real.select("target", "feature"), on=["target", "feature"], how="semi")
    missing = real.join(pred.select("target", "feature"), on=["target", "feature"], how="anti").height
    if missing:
        raise CommandError(f"{missing} measured (target, feature) pairs have no prediction")
    if real.height == 0:
        raise CommandError("no measured (target, feature) pair to score")
    comparison = initialize_de_comparison(real=real, pred=pred)
    pipeline = MetricPipeline(profile="de", break_on_error=True)
    pipeline.compute_de_metrics(comparison)
    return (
        pipeline.get_results()
        .with_columns(pl.col("perturbation").cast(pl.String))
        .sort("perturbation")
    )


def _ordered(table: pl.DataFrame) -> pl.DataFrame:
    return table.with_columns(pl.col("target", "feature").cast(pl.String)).sort("target", "feature")


def _check_columns(frame: pl.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CommandError(f"{what} lack columns {missing}; expected {list(columns)}")


def nan_mean(values) -> float:
    """Mean of the defined values (NaN when none)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else float("nan")
