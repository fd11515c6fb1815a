"""`synthpert score-screens`: predicted screens scored the way the field scores virtual cells.

Every evaluation row's predictions (per cell line) and every in-silico screen of the
configuration become `cell-eval` DE tables (`evaluation.celleval`: the mapping from the
model's probabilities, and the real side from PerturbQA's labels or `derive`'s statistics);
`cell-eval`'s own DE metrics then compare predicted and real per perturbation.

Outputs:
* `--out` (`results/screen_scores.csv`): one line per (kind, name, cell): `kind` `row` (an
  evaluation row) or `screen`, the perturbations and (perturbation, gene) pairs scored, and
  each metric averaged over the perturbations where it is defined (`cell-eval` gives NaN
  where a perturbation has one class only, e.g. ROC-AUC);
* `<stem>_per_pert.csv` beside it: the same metrics per perturbation;
* `--tables DIR`: the DE tables, `rows/{row}/{cell}.pred.csv` with `rows/{cell}.real.csv`, and
  `screens/{model}/{cell}/{pert}.pred.csv` / `.real.csv` (readable by `cell-eval run
  --de-pred/--de-real`);
* `--plot`: the per-perturbation ROC-AUC distribution of each row and screen.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from synthpert.core.figures import save_figure
from synthpert.core.io import write_csv
from synthpert.core.labels import display_cell
from synthpert.errors import CommandError
from synthpert.evaluation import celleval
from synthpert.evaluation.predictions import load_predictions, ordered_cells

log = logging.getLogger(__name__)

SCREEN_COLUMNS = ("model", "cell", "pert", "gene", "p_change", "direction", "label")
STATS_COLUMNS = ("pert", "gene", "log2fc", "pvalue", "padj")
PLOTTED = "roc_auc"


def real_table(labels: pl.DataFrame, stats: pl.DataFrame | None) -> pl.DataFrame:
    """The measured side of `labels` (`pert, gene, label`): `derive`'s statistics of those
    pairs when the cell line is derived, else PerturbQA's labels."""
    if stats is None:
        return celleval.real_from_labels(labels)
    measured = stats.join(labels.select("pert", "gene"), on=["pert", "gene"], how="semi")
    if measured.height != labels.height:
        raise CommandError(
            f"derive statistics lack {labels.height - measured.height} of the {labels.height} "
            "scored (pert, gene) pairs"
        )
    return celleval.real_from_stats(measured)


def score_rows(preds: pl.DataFrame, stats: dict[str, pl.DataFrame]) -> list[tuple[dict, pl.DataFrame, pl.DataFrame, pl.DataFrame]]:
    """(key, per-perturbation scores, predicted table, real table) of each row and cell line."""
    out = []
    for cell in ordered_cells(preds):
        for row in preds.filter(pl.col("cell") == cell)["row"].unique(maintain_order=True).to_list():
            mine = preds.filter((pl.col("row") == row) & (pl.col("cell") == cell))
            answers = celleval.evaluation_answers(mine)
            pred = celleval.predicted_table(answers)
            real = real_table(answers.select("pert", "gene", "label"), stats.get(cell))
            key = {"kind": "row", "name": row, "cell": cell}
            out.append((key, celleval.score(real, pred), pred, real))
    return out


def score_screen(screen: pl.DataFrame, stats: dict[str, pl.DataFrame]) -> tuple[dict, pl.DataFrame, pl.DataFrame, pl.DataFrame] | None:
    """The scores of one screen on its measured genes (None when none was measured)."""
    measured = screen.filter(pl.col("label").is_not_null())
    model, cell, pert = (screen[c][0] for c in ("model", "cell", "pert"))
    if measured.height == 0:
        log.warning("screen %s %s %s: no gene measured, not scored", model, cell, pert)
        return None
    pred = celleval.predicted_table(measured, p_de="p_change", direction="direction")
    real = real_table(measured.select("pert", "gene", "label"), stats.get(cell))
    key = {"kind": "screen", "name": model, "cell": cell}
    return key, celleval.score(real, pred), pred, real


def summary(scored) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(means over perturbations per kind/name/cell, the per-perturbation lines)."""
    per_pert = pl.concat(
        [
            scores.select(
                *(pl.lit(v).alias(k) for k, v in key.items()),
                pl.col("perturbation").alias("pert"),
                pl.exclude("perturbation").cast(pl.Float64),
            ).join(
                real.group_by("target").agg(n_genes=pl.len()).rename({"target": "pert"}), on="pert", how="left"
            )
            for key, scores, _, real in scored
        ],
        how="diagonal_relaxed",
    )
    metrics = [c for c in per_pert.columns if c not in ("kind", "name", "cell", "pert", "n_genes")]
    means = (
        per_pert.group_by("kind", "name", "cell", maintain_order=True)
        .agg(
            n_perts=pl.len(),
            n_genes=pl.col("n_genes").sum(),
            *(pl.col(m).fill_nan(None).mean() for m in metrics),
            *(pl.col(m).fill_nan(None).count().alias(f"{m}_n_perts") for m in (PLOTTED, "pr_auc") if m in metrics),
        )
    )
    return means, per_pert.select("kind", "name", "cell", "pert", "n_genes", *metrics)


def write_tables(scored, folder: Path) -> None:
    """The DE tables of every scored row and screen, written into `folder` at once."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for key, _, pred, real in scored:
        if key["kind"] == "row":
            pred_path = tmp / "rows" / key["name"] / f"{key['cell']}.pred.csv"
            real_path = tmp / "rows" / f"{key['cell']}.real.csv"
        else:
            stem = tmp / "screens" / key["name"] / key["cell"] / pred["target"][0]
            pred_path, real_path = (stem.with_name(f"{stem.name}.{side}.csv") for side in ("pred", "real"))
        for table, path in ((pred, pred_path), (real, real_path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            table.write_csv(path)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)


def auroc_figure(per_pert: pl.DataFrame) -> Figure:
    """Per cell line: the per-perturbation ROC-AUC (cell-eval's) of each row and screen, one
    dot per perturbation (jittered) and the median as a bar."""
    frame = per_pert.filter(pl.col(PLOTTED).is_not_null() & pl.col(PLOTTED).is_not_nan())
    frame = frame.with_columns(line=pl.col("kind") + ": " + pl.col("name"))
    cells = list(dict.fromkeys(per_pert["cell"].to_list()))
    fig = Figure(figsize=(6.4, 0.6 + 2.8 * max(len(cells), 1)), layout="constrained")
    axes = fig.subplots(max(len(cells), 1), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)
    for ax, cell in zip(axes, cells):
        part = frame.filter(pl.col("cell") == cell)
        lines = list(dict.fromkeys(part["line"].to_list()))
        for y, line in enumerate(lines):
            values = part.filter(pl.col("line") == line)[PLOTTED].to_numpy()
            ax.scatter(values, y + rng.uniform(-0.25, 0.25, values.size), s=8, alpha=0.4, color="C0")
            ax.plot([np.median(values)] * 2, [y - 0.35, y + 0.35], color="black", linewidth=2)
        ax.set_yticks(range(len(lines)), [f"{n} ({(part['line'] == n).sum()})" for n in lines])
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(xlim=(0, 1), title=display_cell(cell), xlabel="cell-eval ROC-AUC per perturbation (n perturbations; bar: median)")
    return fig


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", nargs="*", type=Path, default=[], help="evaluation rows' predictions files")
    parser.add_argument("--screens", nargs="*", type=Path, default=[], help="screen Parquet files (synthpert screen)")
    parser.add_argument(
        "--stats", nargs="*", default=[], metavar="CELL=PATH",
        help="derive's stats.parquet of a derived cell line: its real side (default: the labels)",
    )  # fmt: skip
    parser.add_argument("--tables", type=Path, required=True, help="folder for the cell-eval DE tables")
    parser.add_argument("--plot", type=Path, required=True, help="PNG of the per-perturbation ROC-AUC")
    parser.add_argument("--out", type=Path, required=True, help="CSV of the averages; <stem>_per_pert.csv beside it")


def read_stats(specs: list[str]) -> dict[str, pl.DataFrame]:
    stats = {}
    for spec in specs:
        cell, sep, path = spec.partition("=")
        if not sep or not cell or not path:
            raise CommandError(f"--stats takes CELL=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise CommandError(f"derive statistics of {cell} not found: {path}")
        frame = pl.read_parquet(path)
        missing = [c for c in STATS_COLUMNS if c not in frame.columns]
        if missing:
            raise CommandError(f"{path} lacks columns {missing}; expected derive's stats.parquet")
        stats[cell] = frame.select(STATS_COLUMNS)
    return stats


def read_screen(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise CommandError(f"screen file not found: {path}")
    if path.suffix != ".parquet":
        raise CommandError(f"--screens takes the screen's .parquet (it keeps the labels' types), got {path}")
    frame = pl.read_parquet(path)
    missing = [c for c in SCREEN_COLUMNS if c not in frame.columns]
    if missing:
        raise CommandError(f"screen {path} lacks columns {missing}; expected a synthpert screen Parquet")
    if frame.height == 0:
        raise CommandError(f"screen {path} has no genes")
    return frame


def main(args: argparse.Namespace) -> None:
    if not args.predictions and not args.screens:
        raise CommandError("nothing to score: give --predictions and/or --screens")
    stats = read_stats(args.stats)
    screens = [read_screen(p) for p in args.screens]
    scored = score_rows(load_predictions(args.predictions), stats) if args.predictions else []
    for screen in screens:
        result = score_screen(screen, stats)
        if result is not None:
            scored.append(result)
    if not scored:
        raise CommandError("no row or screen had a measured gene to score")
    means, per_pert = summary(scored)
    write_tables(scored, args.tables)
    save_figure(auroc_figure(per_pert), args.plot)
    out = Path(args.out)
    write_csv(per_pert, out.with_name(f"{out.stem}_per_pert{out.suffix}"))
    write_csv(means, out)  # last: the averages mark a complete run
    log.info("cell-eval DE metrics of %d rows and screens -> %s", means.height, out)
