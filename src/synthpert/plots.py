"""Figures for the Snakemake report (PNG, written atomically).

Sub-actions of `synthpert plots`:
- `roc`: ROC curves of one task (`de3` = DE, `dir` = direction), a panel per cell line,
  a curve per model row (pooled over the cell line's tuples; legend gives the pooled and
  PerturbQA's per-gene AUROC).
- `confusion`: three-class confusion matrix per model row (rows: truth; columns:
  prediction and "unparsed"), row-normalised colours with counts written in.
- `grades`: critic grade counts per cell line, from a CSV with columns `grade, cell, n`.
- `loss`: training loss against step, a line per `train_log.csv` (`step, loss`),
  labelled by the two folders holding it (`{split}/{variant}`).

Figures are built with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from synthpert.cli import CommandError
from synthpert.io import atomic_path
from synthpert.labels import CLASS_KEYS, NOT_DE, UP, display_cell
from synthpert.metrics import CLASSES, auroc_per_gene, auroc_pooled, confusion
from synthpert.tables import load_predictions, ordered_cells

GRADES = ("excellent", "good", "average", "bad", "terrible")
TASKS = {
    "de3": ("score_de", "differential expression"),
    "dir": ("score_up", "direction (up vs down)"),
}


def save(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def roc_figure(preds: pl.DataFrame, task: str) -> Figure:
    """One panel per cell line, one pooled ROC curve per model row."""
    score, title = TASKS[task]
    rows = sorted(preds["row"].unique().to_list())
    cells = ordered_cells(preds)
    fig = Figure(figsize=(4.2 * len(cells), 4.2), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, cell in zip(axes, cells):
        for row in rows:
            part = preds.filter(
                (pl.col("row") == row) & (pl.col("task") == task) & (pl.col("cell") == cell)
            ).filter(pl.col(score).is_not_null())
            truth = (part["label"] != NOT_DE) if task == "de3" else (part["label"] == UP)
            if part.height == 0 or truth.n_unique() < 2:
                continue
            fpr, tpr, _ = roc_curve(truth.to_numpy(), part[score].to_numpy())
            pooled = auroc_pooled(truth, part[score]).value
            per_gene = auroc_per_gene(part["gene"], truth, part[score]).value
            ax.plot(fpr, tpr, label=f"{row} ({pooled:.2f}; per gene {per_gene:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(
            title=f"{display_cell(cell)}: {title}",
            xlabel="false positive rate",
            ylabel="true positive rate",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right", title="row (pooled AUROC)", title_fontsize=7)
        else:
            ax.text(0.5, 0.5, "one class only", ha="center", va="center", transform=ax.transAxes)
    return fig


def confusion_figure(preds: pl.DataFrame) -> Figure:
    """One three-class confusion matrix per model row, pooled over cell lines."""
    rows = sorted(preds["row"].unique().to_list())
    if not rows:
        raise CommandError("no predictions to plot")
    fig = Figure(figsize=(4.0 * len(rows), 3.8), layout="constrained")
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    names = [CLASS_KEYS[c] for c in CLASSES]
    for ax, row in zip(axes, rows):
        part = preds.filter((pl.col("row") == row) & (pl.col("task") == "de3"))
        cm = confusion(part["label"], part["pred"])
        totals = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.6 else "black",
            )
        ax.set_xticks(range(cm.shape[1]), [*names, "unparsed"], rotation=30)
        ax.set_yticks(range(cm.shape[0]), names)
        ax.set(title=f"{row} (n={int(cm.sum())})", xlabel="predicted", ylabel="true")
    return fig


def grades_figure(grades: pl.DataFrame) -> Figure:
    """Grouped bars: critic grade counts, a bar per cell line."""
    missing = [c for c in ("grade", "cell", "n") if c not in grades.columns]
    if missing:
        raise CommandError(f"grades table lacks columns {missing}; expected grade, cell, n")
    unknown = sorted(set(grades["grade"].to_list()) - set(GRADES))
    if unknown:
        raise CommandError(f"unknown grades {unknown}; expected {list(GRADES)}")
    cells = ordered_cells(grades)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(cells), 1)
    for i, cell in enumerate(cells):
        counts = grades.filter(pl.col("cell") == cell).group_by("grade").agg(pl.col("n").sum())
        lookup = dict(zip(counts["grade"].to_list(), counts["n"].to_list()))
        x = np.arange(len(GRADES)) + (i - (len(cells) - 1) / 2) * width
        ax.bar(x, [lookup.get(g, 0) for g in GRADES], width, label=display_cell(cell))
    ax.set_xticks(range(len(GRADES)), GRADES)
    ax.set(title="critic grades of the teacher's traces", ylabel="traces")
    ax.legend()
    return fig


def loss_figure(logs: dict[str, pl.DataFrame]) -> Figure:
    """Training loss against step, a line per labelled log."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, log in logs.items():
        missing = [c for c in ("step", "loss") if c not in log.columns]
        if missing:
            raise CommandError(
                f"training log {label!r} lacks columns {missing}; expected step, loss"
            )
        points = log.select("step", "loss").drop_nulls().sort("step")
        ax.plot(points["step"].to_numpy(), points["loss"].to_numpy(), label=label)
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.legend()
    return fig


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    roc = sub.add_parser("roc", help="ROC curves per cell line, a curve per model row")
    roc.add_argument("--task", choices=sorted(TASKS), required=True)
    roc.add_argument("--predictions", nargs="+", required=True, type=Path)
    cm = sub.add_parser("confusion", help="three-class confusion matrix per model row")
    cm.add_argument("--predictions", nargs="+", required=True, type=Path)
    grades = sub.add_parser("grades", help="critic grade distribution")
    grades.add_argument(
        "--grades", required=True, type=Path, help="CSV with columns grade, cell, n"
    )
    loss = sub.add_parser("loss", help="training loss curves")
    loss.add_argument(
        "--logs", nargs="+", required=True, type=Path, help="train_log.csv files (step, loss)"
    )
    for action in (roc, cm, grades, loss):
        action.add_argument("--out", required=True, type=Path, help="PNG to write")


def main(args: argparse.Namespace) -> None:
    if args.action == "roc":
        fig = roc_figure(load_predictions(args.predictions), args.task)
    elif args.action == "confusion":
        fig = confusion_figure(load_predictions(args.predictions))
    elif args.action == "grades":
        fig = grades_figure(_read_csv(args.grades))
    else:
        fig = loss_figure({"/".join(path.parent.parts[-2:]): _read_csv(path) for path in args.logs})
    save(fig, args.out)


def _read_csv(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise CommandError(f"file not found: {path}")
    return pl.read_csv(path)
