"""`synthpert screen`: an in-silico screen, one perturbation asked against many genes.

Every gene is asked the three-class question exactly as `synthpert ask` (and the
evaluation) asks it, batched by the backend. The answers are ranked by the probability of
a change, P(up) + P(down) = 1 - P(not DE) (for a backend without probabilities: the
paper's mapping, 1 for a change, 0 for none, 0.5 when unparsed).

Outputs, beside `--out` (`<name>.csv`):
* `<name>.csv` / `<name>.parquet`: one row per gene, ranked (the Parquet adds the raw text);
* `<name>.png`: volcano-style plot, direction P(up) - P(down) against -log10 P(not DE),
  coloured by PerturbQA's measurement where there is one;
* `<name>.summary.json`: counts and, where PerturbQA measured the perturbation in this
  cell line, the agreement with the measurement (three-class accuracy next to the
  majority class's, AUROC of P(change) for DE);
* `<name>.requests.jsonl`: the append-only request log; a killed screen resumes from it
  and a rerun pays for nothing it already has.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from synthpert.core.figures import save_figure
from synthpert.core.io import atomic_path, write_csv, write_parquet
from synthpert.core.labels import CLASS_NAMES, DOWN, NOT_DE, UP, display_cell
from synthpert.errors import CommandError
from synthpert.evaluation.metrics import auroc_pooled, three_class_metrics
from synthpert.tools import question

log = logging.getLogger(__name__)

CLASS_COLORS = {NOT_DE: "#9e9e9e", DOWN: "#1f77b4", UP: "#d62728"}
LABELLED = 12  # genes named in the plot: the most likely to change
FLOOR = 1e-6  # P(not DE) below this is drawn at this height
CSV_COLUMNS = [
    *("rank", "model", "cell", "pert", "gene", "answer", "p_change", "direction", "p_not_de", "p_down", "p_up"),
    *("status", "score_source", "measured", "role", "reasoning"),
]
OUTPUTS = {
    "csv": ".csv", "parquet": ".parquet", "png": ".png", "summary": ".summary.json", "requests": ".requests.jsonl",
}  # fmt: skip


def read_gene_file(path: Path) -> list[str]:
    """Gene symbols separated by newlines, commas or spaces; `#` starts a comment."""
    if not path.is_file():
        raise CommandError(f"gene file {path} not found")
    text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
    genes = [g for g in re.split(r"[\s,]+", text) if g]
    if not genes:
        raise CommandError(f"gene file {path} names no genes")
    return genes


def rank(preds: pl.DataFrame, rows: pl.DataFrame, model: str) -> pl.DataFrame:
    """Screen table: the predictions with P(change), direction, the measurement and the
    reasoning, ranked by P(change) (ties by gene)."""
    mapped_direction = (
        pl.when(pl.col("pred") == UP).then(1.0).when(pl.col("pred") == DOWN).then(-1.0).otherwise(0.0)
    )
    class_name = pl.col("pred").replace_strict(CLASS_NAMES, default=None, return_dtype=pl.String)
    measured_name = pl.col("label").replace_strict(CLASS_NAMES, default=None, return_dtype=pl.String)
    reasoning = pl.struct("raw_text", "finish_reason").map_elements(
        lambda r: question.reasoning_text(r["raw_text"], r["finish_reason"]), return_dtype=pl.String
    )
    return (
        preds.join(rows.select("qid", "role"), on="qid", how="left")
        .with_columns(
            model=pl.lit(model),
            answer=class_name,
            p_change=pl.col("score_de"),
            direction=pl.when(pl.col("p_up").is_not_null())
            .then(pl.col("p_up") - pl.col("p_down"))
            .otherwise(mapped_direction),
            measured=measured_name,
            reasoning=reasoning,
        )
        .sort(["p_change", "gene"], descending=[True, False])
        .with_row_index("rank", offset=1)
    )


def agreement(screen: pl.DataFrame) -> dict:
    """Agreement with PerturbQA on the screened genes it measured (None where undefined)."""
    measured = screen.filter(pl.col("label").is_not_null())
    if measured.height == 0:
        return {"measured": 0}
    metrics = three_class_metrics(measured["label"], measured["pred"])
    majority = measured["label"].value_counts().get_column("count").max() / measured.height
    auroc = auroc_pooled((measured["label"] != NOT_DE).cast(pl.Int8), measured["p_change"]).value
    return {
        "measured": measured.height,
        "roles": dict(sorted(measured["role"].value_counts().iter_rows())),
        "measured_changed": int((measured["label"] != NOT_DE).sum()),
        "accuracy": metrics["accuracy"],
        "majority_accuracy": majority,
        "macro_f1": metrics["macro_f1"],
        "auroc_de": None if math.isnan(auroc) else auroc,
        "unparsed": metrics["n_unparsed"],
    }


def volcano_figure(screen: pl.DataFrame, title: str, subtitle: str) -> Figure:
    """Direction P(up) - P(down) against -log10 P(not DE), a volcano's axes (the height
    spreads the confident end, 0.99 vs 0.9999; capped at `FLOOR`); colour = measured class
    (hollow when not measured); the most likely changes are named."""
    screen = screen.with_columns(y=-(1 - pl.col("p_change")).clip(lower_bound=FLOOR).log10())
    fig = Figure(figsize=(6.4, 5.0), layout="constrained")
    ax = fig.subplots()
    ax.axvline(0, color="grey", linewidth=0.8, linestyle=":")
    not_measured = screen.filter(pl.col("label").is_null())
    if not_measured.height:
        ax.scatter(
            not_measured["direction"], not_measured["y"], s=22, facecolors="none", edgecolors="black",
            linewidths=0.7, label="not measured",
        )
    for cls, color in CLASS_COLORS.items():
        part = screen.filter(pl.col("label") == cls)
        if part.height:
            label = f"measured {CLASS_NAMES[cls]}"
            ax.scatter(part["direction"], part["y"], s=22, color=color, alpha=0.8, label=label)
    for row in screen.head(LABELLED).iter_rows(named=True):
        xy = (row["direction"], row["y"])
        ax.annotate(row["gene"], xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlim=(-1.05, 1.05), xlabel="direction: P(up) - P(down)", ylabel="-log10 P(not differentially expressed)")
    ax.set_title(f"{title}\n{subtitle}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def output_paths(out: Path) -> dict[str, Path]:
    """The files of a screen, named after its CSV."""
    if out.suffix != ".csv":
        raise CommandError(f"--out must name the .csv file of the screen, got {out}")
    return {kind: out.with_name(out.stem + suffix) for kind, suffix in OUTPUTS.items()}


def _subtitle(summary: dict) -> str:
    parts = [f"{summary['genes']} genes"]
    if summary["measured"]:
        auroc = summary["auroc_de"]
        parts.append(
            f"PerturbQA measured {summary['measured']}: accuracy {summary['accuracy']:.2f} "
            f"(majority {summary['majority_accuracy']:.2f}), AUROC "
            + ("n/a" if auroc is None else f"{auroc:.2f}")
        )
    else:
        parts.append("not measured in PerturbQA")
    if not summary["pert_seen_in_training"]:
        parts.append("perturbation unseen in training")
    return "; ".join(parts)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    question.add_common_arguments(parser)
    genes = parser.add_mutually_exclusive_group(required=True)
    genes.add_argument("--genes", type=Path, help="file of gene symbols (one per line, or comma separated)")
    genes.add_argument("--all-measured", action="store_true", help="every gene PerturbQA measured in the cell line")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV to write (default: RESULTS/screens/MODEL/CELL/PERT.csv); the Parquet, plot, summary and "
        "request log go beside it",
    )


def main(args: argparse.Namespace) -> None:
    s = question.setup(args)
    if args.all_measured:
        genes = question.measured_genes(s.table, s.cell)
    else:
        genes = question.resolve_genes(read_gene_file(args.genes), s.table, s.cell, args.allow_unknown)
    out = args.out or args.results / "screens" / s.model.name / s.cell / f"{s.pert}.csv"
    paths = output_paths(out)
    rows = question.question_rows(s.table, s.cell, s.pert, genes)
    log.info("screening %s knockdown in %s: %d genes with %s", s.pert, s.cell, rows.height, s.model.describe())
    preds = question.answer(rows, s.model, s.generation, paths["requests"], desc=f"screen {s.pert} {s.cell}")
    screen = rank(preds, rows, s.model.name)
    summary = {
        "model": s.model.describe(),
        "cell": s.cell,
        "pert": s.pert,
        "split": s.split,
        "genes": screen.height,
        "pert_seen_in_training": question.seen_in_training(s.table, "pert", s.pert),
        "notes": s.notes,
        "predicted": dict(sorted(screen["answer"].fill_null("unparsed").value_counts().iter_rows())),
        **agreement(screen),
    }
    title = f"{s.pert} knockdown in {display_cell(s.cell)}: {s.model.name}"
    fig = volcano_figure(screen, title, _subtitle(summary))
    write_parquet(screen.select(*CSV_COLUMNS, "pred", "label", "qid", "raw_text", "finish_reason"), paths["parquet"])
    save_figure(fig, paths["png"])
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    write_csv(screen.select(CSV_COLUMNS), paths["csv"])  # last: the CSV marks a complete screen
    top = ", ".join(screen["gene"].head(5))
    log.info("wrote %s; most likely changed: %s\n%s", paths["csv"], top, json.dumps(summary, indent=2))
