"""Figures for the Snakemake report (PNG, written atomically).

Sub-actions of `synthpert plots`:
- `roc`: ROC curves of one task (`de3` = DE, `dir` = direction), a panel per cell line,
  a curve per model row (pooled over the cell line's tuples; legend gives the pooled and
  PerturbQA's per-gene AUROC).
- `confusion`: three-class confusion matrix per model row (rows: truth; columns:
  prediction and "unparsed"), row-normalised colours with counts written in; a grid of
  panels, so that many rows stay readable at page width.
- `views`: one of tables 1-4 as a dot plot, a line per row, the published numbers marked.
  Tables 1-2: a panel per cell line with the four AUROC views of each computed row (per
  gene, per perturbation, pooled from scores, the paper's protocol with its 20% subsets' mean +- SD) and the
  reported rows' printed numbers. Tables 3-4: a panel per printed metric (accuracy, F1 per
  class) of the pooled (`all`) or held-out cell line.
- `grades`: critic grade counts per cell line, from a CSV with columns `grade, cell, n`.
- `loss`: training loss against step, a line per `train_log.csv` (`step, loss`),
  labelled by the two folders holding it (`{split}/{variant}`).

Figures are built with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from synthpert.core.figures import save_figure
from synthpert.core.labels import CLASS_KEYS, NOT_DE, UP, display_cell
from synthpert.core.prompts import GRADES
from synthpert.errors import CommandError
from synthpert.evaluation.metrics import CLASSES, auroc_per_gene, auroc_pooled, confusion
from synthpert.evaluation.predictions import load_predictions, ordered_cells, without_failures

TASKS = {
    "de3": ("score_de", "differential expression"),
    "dir": ("score_up", "direction (up vs down)"),
}


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


def _grid(fig: Figure, n: int, ncols: int):
    """`n` axes on a grid of `ncols` columns (unused cells hidden), row-major."""
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def confusion_figure(preds: pl.DataFrame, ncols: int = 3) -> Figure:
    """One three-class confusion matrix per model row, pooled over cell lines."""
    rows = sorted(preds["row"].unique().to_list())
    if not rows:
        raise CommandError("no predictions to plot")
    ncols = min(ncols, len(rows))
    fig = Figure(figsize=(3.6 * ncols, 3.4 * math.ceil(len(rows) / ncols)), layout="constrained")
    axes = _grid(fig, len(rows), ncols)
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


# Tables 1-2: column suffix -> (legend label, marker style) of the computed AUROC views ...
AUROC_VIEWS = {
    "auroc_per_gene": ("per gene (PerturbQA's metric)", {"marker": "o", "color": "C0"}),
    "auroc_per_pert": ("per perturbation (a screen's ranking)", {"marker": "^", "color": "C4"}),
    "auroc_pooled": ("pooled, from scores", {"marker": "s", "color": "C1"}),
    "auroc_paper": (
        "paper protocol (hard answers 1/0/0.5, pooled)",
        {"marker": "D", "color": "C2"},
    ),
}
# ... and of the numbers a paper printed (reported rows).
PRINTED = {
    "auroc_per_gene": (
        "printed, per gene (PerturbQA)",
        {"marker": "o", "facecolor": "none", "edgecolor": "C0", "s": 60},
    ),
    "auroc_as_reported": ("printed by the SynthPert paper", {"marker": "*", "color": "k", "s": 90}),
}
CLASS_VIEW_METRICS = ("accuracy", "f1_not_de", "f1_down", "f1_up")


def views_figure(table: pl.DataFrame, title: str) -> Figure:
    """Tables 1-2 (AUROC views per cell line) or 3-4 (printed three-class metrics)."""
    for column in ("kind", "row"):
        if column not in table.columns:
            raise CommandError(f"table lacks column {column!r}; expected a table1-4 CSV")
    if any(c.endswith("_auroc_pooled") or c.endswith("_auroc_as_reported") for c in table.columns):
        return _auroc_views(table, title)
    if "accuracy" in table.columns and "cell" in table.columns:
        return _class_views(table, title)
    raise CommandError("table has neither AUROC columns (tables 1-2) nor accuracy (tables 3-4)")


def _line_labels(table: pl.DataFrame) -> tuple[list[str], pl.DataFrame]:
    """One y line per computed row, and one per reported model (both papers' copies of a
    model share its line); `line` is added to `table`."""
    frame = table.with_columns(
        line=pl.when(pl.col("kind") == "reported")
        .then(pl.col("row") + " (reported)")
        .otherwise(pl.col("row"))
    )
    return list(dict.fromkeys(frame["line"].to_list())), frame


def _auroc_views(table: pl.DataFrame, title: str, ncols: int = 2) -> Figure:
    lines, frame = _line_labels(table)
    cells = list(dict.fromkeys(c.split("_auroc_", 1)[0] for c in frame.columns if "_auroc_" in c))
    y = {line: i for i, line in enumerate(lines)}
    ncols = min(ncols, len(cells))
    height = max(3.0, 0.26 * len(lines) + 1.2)
    fig = Figure(
        figsize=(5.6 * ncols, height * math.ceil(len(cells) / ncols) + 0.8), layout="constrained"
    )
    axes = _grid(fig, len(cells), ncols)
    computed = frame.filter(pl.col("kind") == "computed")
    reported = frame.filter(pl.col("kind") == "reported")
    for ax, cell in zip(axes, cells):
        for offset, (suffix, (label, style)) in zip((-0.27, -0.09, 0.09, 0.27), AUROC_VIEWS.items()):
            part = _points(computed, f"{cell}_{suffix}")
            ax.scatter(part[1], [y[line] + offset for line in part[0]], label=label, **style)
        mean, sd = f"{cell}_auroc_paper_subsets_mean", f"{cell}_auroc_paper_subsets_sd"
        if mean in computed.columns and sd in computed.columns:
            sub = computed.select("line", pl.col(mean, sd).cast(pl.Float64)).drop_nulls(mean)
            ax.errorbar(
                sub[mean].to_numpy(),
                [y[line] + 0.38 for line in sub["line"]],
                xerr=sub[sd].fill_null(0).to_numpy(),
                fmt="|",
                color="C2",
                alpha=0.6,
                label="paper protocol, 3 random 20% subsets (mean +- SD)",
            )
        for suffix, (label, style) in PRINTED.items():
            part = _points(reported, f"{cell}_{suffix}")
            ax.scatter(part[1], [y[line] for line in part[0]], label=label, zorder=3, **style)
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        _line_axis(ax, lines, frame)
        ax.set(title=cell, xlabel="AUROC")
    _shared_legend(fig, axes)
    fig.suptitle(title)
    return fig


def _class_views(table: pl.DataFrame, title: str, ncols: int = 2) -> Figure:
    # Computed rows pooled over cell lines (table 3) or of the held-out one (table 4); the
    # papers' rows are pooled over the cell lines they evaluated.
    computed = table.filter(pl.col("kind") == "computed")
    cells = computed["cell"].unique(maintain_order=True).to_list()
    cell = "all" if "all" in cells or not cells else cells[0]
    lines, frame = _line_labels(
        table.filter((pl.col("kind") == "reported") | (pl.col("cell") == cell))
    )
    metrics = [m for m in CLASS_VIEW_METRICS if m in frame.columns]
    y = {line: i for i, line in enumerate(lines)}
    height = max(3.0, 0.26 * len(lines) + 1.2)
    fig = Figure(
        figsize=(5.6 * ncols, height * math.ceil(len(metrics) / ncols) + 0.8),
        layout="constrained",
    )
    axes = _grid(fig, len(metrics), ncols)
    for ax, metric in zip(axes, metrics):
        for kind, label, style in (
            ("computed", "computed", {"marker": "o", "color": "C0"}),
            ("reported", "printed by a paper", {"marker": "*", "color": "k", "s": 90}),
        ):
            part = _points(frame.filter(pl.col("kind") == kind), metric)
            ax.scatter(part[1], [y[line] for line in part[0]], label=label, **style)
        _line_axis(ax, lines, frame)
        ax.set_xlim(-0.02, 1.02)
        ax.set(title=metric, xlabel=metric)
    _shared_legend(fig, axes)
    fig.suptitle(f"{title} (cell line: {cell})")
    return fig


def _line_axis(ax, lines: list[str], frame: pl.DataFrame) -> None:
    """Row labels top to bottom, a rule between this run's rows and the papers' rows."""
    ax.set_yticks(range(len(lines)), lines, fontsize=8)
    ax.set_ylim(len(lines) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    n_computed = frame.filter(pl.col("kind") == "computed")["line"].n_unique()
    if 0 < n_computed < len(lines):
        ax.axhline(n_computed - 0.5, color="grey", linewidth=0.8)


def _points(frame: pl.DataFrame, column: str) -> tuple[list[str], np.ndarray]:
    """(line labels, values) of the non-empty cells of `column` (none if it is absent)."""
    if column not in frame.columns:
        return [], np.array([])
    values = frame.select("line", pl.col(column).cast(pl.Float64)).drop_nulls().drop_nans()
    return values["line"].to_list(), values[column].to_numpy()


def _shared_legend(fig: Figure, axes) -> None:
    """One legend below the panels, each label once."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=2, fontsize=8)


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
    views = sub.add_parser(
        "views", help="a table 1-4 CSV as a dot plot per cell line or metric, papers marked"
    )
    views.add_argument("--table-file", required=True, type=Path, help="results/table{n}.csv")
    grades = sub.add_parser("grades", help="critic grade distribution")
    grades.add_argument(
        "--grades", required=True, type=Path, help="CSV with columns grade, cell, n"
    )
    loss = sub.add_parser("loss", help="training loss curves")
    loss.add_argument(
        "--logs", nargs="+", required=True, type=Path, help="train_log.csv files (step, loss)"
    )
    for action in (roc, cm, views, grades, loss):
        action.add_argument("--out", required=True, type=Path, help="PNG to write")


def main(args: argparse.Namespace) -> None:
    if args.action == "roc":
        fig = roc_figure(without_failures(load_predictions(args.predictions)), args.task)
    elif args.action == "confusion":
        fig = confusion_figure(without_failures(load_predictions(args.predictions)))
    elif args.action == "views":
        table = _read_csv(args.table_file, infer_schema_length=None)
        fig = views_figure(table, _view_title(args.table_file.stem))
    elif args.action == "grades":
        fig = grades_figure(_read_csv(args.grades))
    else:
        fig = loss_figure({"/".join(path.parent.parts[-2:]): _read_csv(path) for path in args.logs})
    save_figure(fig, args.out)


def _view_title(stem: str) -> str:
    what = {
        "table1": "Table 1: differential expression AUROC, four views",
        "table2": "Table 2: direction AUROC, four views",
        "table3": "Table 3: three-class answers, default split",
        "table4": "Table 4: three-class answers, held-out cell line",
    }
    return what.get(stem, stem)


def _read_csv(path: Path, **options) -> pl.DataFrame:
    if not path.is_file():
        raise CommandError(f"file not found: {path}")
    return pl.read_csv(path, **options)
