"""Tables 1-4 of the paper from the predictions of every model row.

- Table 1 (DE) and table 2 (direction): AUROC per cell line under four views.
  PerturbQA's per-gene AUROC (`{Cell}_auroc_per_gene`, with the genes averaged
  `{Cell}_n_genes`: the perturbations ranked for one target gene), the per-perturbation
  view (`{Cell}_auroc_per_pert` and average precision `{Cell}_ap_per_pert`, averaged over
  `{Cell}_n_perts` perturbations with both classes: the genes ranked within one knockdown,
  a screen's ranking) and one pooled AUROC (`{Cell}_auroc_pooled`, with its tuples
  `{Cell}_n`) rank the scores: `score_de` of the `de3` rows against label != 0; `score_up`
  of the `dir` rows against label == 2. The SynthPert paper's protocol
  (`{Cell}_auroc_paper`, same `{Cell}_n` tuples) pools the hard answers mapped to 1 / 0 /
  0.5 (`metrics.auroc_paper`); `{Cell}_auroc_paper_subsets_mean` / `_sd` repeat it on three
  seeded random 20% subsets of `{Cell}_n_subset` tuples each. Reported rows of the
  SynthPert paper carry `{Cell}_auroc_as_reported`: its caption says per gene, its code
  pools hard labels, so that number is neither of our columns.
- Table 3 (default split) and table 4 (a `{cell}_holdout` split, that cell only):
  three-class precision/recall/F1 per class, accuracy, macro-F1, balanced accuracy and
  MCC of the `de3` answers (unparsed answers count as wrong), per row for every cell
  line and pooled over them (`cell = all`, table 3 only). Companions: `*_ci.csv`
  (bootstrap percentile 95% intervals, long format) and `*_unseen.csv` (the same
  metrics on test tuples whose perturbation has no training row in any cell line;
  `n_all` is the count before that filter).

A failed request (status `failed`, written only under `evaluate.allow_failures`) is no
answer: every metric leaves it out, and `n_failed` (`{Cell}_n_failed` in tables 1 and 2)
counts it; `n` counts the answers scored.

Every table has `kind`: `computed` rows come from predictions; `reported` rows are the
published numbers of `published/reported.csv` (with their `paper` and `source`), appended
below and never mixed into computed rows; a metric a paper does not report is empty.

The questions file is the truth: every row must answer every question (a `de3` row per
question and a `dir` row per differentially expressed one), with the same label.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
from pathlib import Path

import polars as pl

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import write_csv
from synthpert.core.labels import NOT_DE, UP, display_cell
from synthpert.core.settings import Tables
from synthpert.errors import CommandError
from synthpert.evaluation.metrics import (
    auroc_paper,
    auroc_paper_subsets,
    auroc_per_gene,
    auroc_pooled,
    bootstrap_three_class,
    per_perturbation,
    three_class_metrics,
)
from synthpert.evaluation.predictions import load_predictions, ordered_cells, without_failures

log = logging.getLogger(__name__)

QUESTION_COLUMNS = ("qid", "cell", "pert", "gene", "label")
REPORTED_COLUMNS = ("table", "split", "paper", "model", "cell", "metric", "value", "source")


# ---------------------------------------------------------------- input


def default_reported_path() -> Path:
    return Path(str(importlib.resources.files("synthpert") / "published" / "reported.csv"))


def check_predictions(preds: pl.DataFrame, questions: pl.DataFrame) -> pl.DataFrame:
    """Check each row answers every question once per task, with the questions' truth.

    Returns the predictions, `qid` cast to the questions' type.
    """
    preds = preds.with_columns(pl.col("qid").cast(questions.schema["qid"]))
    bad_task = preds.filter(~pl.col("task").is_in(["de3", "dir"])).height
    if bad_task:
        raise CommandError(f"{bad_task} prediction rows have a task other than de3/dir")
    dup = preds.select("row", "qid", "task").is_duplicated().sum()
    if dup:
        raise CommandError(f"{dup} prediction rows repeat a (row, qid, task)")
    truth = questions.select("qid", "cell", "pert", "gene", "label")
    joined = preds.join(truth, on="qid", how="left", suffix="_truth")
    unknown = joined.filter(pl.col("label_truth").is_null()).height
    if unknown:
        raise CommandError(f"{unknown} prediction rows have a qid that is not in the questions")
    wrong = joined.filter(
        (pl.col("label") != pl.col("label_truth"))
        | (pl.col("cell") != pl.col("cell_truth"))
        | (pl.col("pert") != pl.col("pert_truth"))
        | (pl.col("gene") != pl.col("gene_truth"))
    )
    if wrong.height:
        raise CommandError(
            f"{wrong.height} prediction rows disagree with the questions on cell/pert/gene/label"
        )
    for row in preds["row"].unique().sort().to_list():
        mine = preds.filter(pl.col("row") == row)
        for task, asked in (("de3", truth), ("dir", truth.filter(pl.col("label") != NOT_DE))):
            answered = mine.filter(pl.col("task") == task).select("qid")
            missing = asked.join(answered, on="qid", how="anti").height
            if missing:
                raise CommandError(
                    f"row {row!r}: {missing} of {asked.height} questions have no {task} prediction"
                )
            extra = answered.join(asked.select("qid"), on="qid", how="anti").height
            if extra:
                raise CommandError(
                    f"row {row!r}: {extra} {task} predictions for questions that do not ask it"
                )
    return preds


def load_reported(path: str | Path, table: int) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"reported numbers not found: {path}")
    frame = pl.read_csv(path, schema_overrides={"value": pl.Float64, "table": pl.Int64})
    missing = [c for c in REPORTED_COLUMNS if c not in frame.columns]
    if missing:
        raise CommandError(f"{path} lacks columns {missing}")
    return frame.filter(pl.col("table") == table)


def _row_order(preds: pl.DataFrame, order: tuple[str, ...]) -> list[str]:
    rows = preds["row"].unique().to_list()
    wanted = [r for r in order if r in rows]
    return wanted + sorted(r for r in rows if r not in wanted)


def _score_source(frame: pl.DataFrame) -> str:
    return "+".join(sorted(frame["score_source"].drop_nulls().unique().to_list()))


# ---------------------------------------------------------------- tables 1 and 2


def auroc_table(
    preds: pl.DataFrame, task: str, split: str, rows: list[str], seed: int
) -> pl.DataFrame:
    """Wide AUROC table: one line per row, the three AUROC views per cell line.

    Tuples are sorted by `qid` before the seeded subsets are drawn, so every row is scored on
    the same subsets.
    """
    score, positive = (
        ("score_de", pl.col("label") != NOT_DE)
        if task == "de3"
        else ("score_up", pl.col("label") == UP)
    )
    records = []
    for row in rows:
        everything = preds.filter((pl.col("row") == row) & (pl.col("task") == task))
        mine = without_failures(everything)
        unscored = mine.filter(pl.col(score).is_null() | pl.col(score).is_nan()).height
        if unscored:
            raise CommandError(f"row {row!r}: {unscored} {task} predictions have no {score}")
        record = {
            "split": split,
            "kind": "computed",
            "row": row,
            "score_source": _score_source(mine),
        }
        for cell in ordered_cells(preds):
            part = mine.filter(pl.col("cell") == cell).sort("qid")
            truth = part.select(positive).to_series()
            per_gene = auroc_per_gene(part["gene"], truth, part[score])
            per_pert = per_perturbation(part["pert"], truth, part[score])
            pooled = auroc_pooled(truth, part[score])
            paper = auroc_paper(truth, part["pred"], task)
            subsets = auroc_paper_subsets(truth, part["pred"], task, seed)
            name = display_cell(cell)
            record[f"{name}_auroc_per_gene"] = _nan_to_none(per_gene.value)
            record[f"{name}_n_genes"] = per_gene.n_genes
            record[f"{name}_auroc_per_pert"] = _nan_to_none(per_pert.auroc)
            record[f"{name}_ap_per_pert"] = _nan_to_none(per_pert.ap)
            record[f"{name}_n_perts"] = per_pert.n_perts
            record[f"{name}_auroc_pooled"] = _nan_to_none(pooled.value)
            record[f"{name}_auroc_paper"] = _nan_to_none(paper.value)
            record[f"{name}_n"] = pooled.n
            record[f"{name}_n_failed"] = everything.filter(pl.col("cell") == cell).height - part.height
            record[f"{name}_auroc_paper_subsets_mean"] = _nan_to_none(subsets.mean)
            record[f"{name}_auroc_paper_subsets_sd"] = _nan_to_none(subsets.sd)
            record[f"{name}_n_subset"] = subsets.n
        records.append(record)
    return pl.DataFrame(records, infer_schema_length=None)


def reported_auroc_rows(reported: pl.DataFrame) -> pl.DataFrame:
    """Reported AUROCs laid out like `auroc_table` (`{Cell}_{metric}` columns).

    The metric is the one the paper printed: `auroc_per_gene` lands beside ours,
    `auroc_as_reported` in a column of its own; nothing is renamed into a view we compute.
    """
    if reported.height == 0:
        return pl.DataFrame()
    wide = (
        reported.with_columns(
            column=pl.col("cell").map_elements(display_cell, return_dtype=pl.String)
            + "_"
            + pl.col("metric")
        )
        .pivot(
            on="column",
            index=["split", "model", "paper", "source"],
            values="value",
            maintain_order=True,
        )
        .rename({"model": "row"})
    )
    return wide.with_columns(kind=pl.lit("reported"))


# ---------------------------------------------------------------- tables 3 and 4


def three_class_table(
    preds: pl.DataFrame,
    split: str,
    rows: list[str],
    cells: list[str],
    pooled: bool,
    counts_before: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One line per (row, cell) [+ cell "all"]: the three-class metrics of the de3 answers."""
    records = []
    for row, cell, part in _groups(preds, rows, cells, pooled):
        record = {"split": split, "kind": "computed", "row": row, "cell": cell}
        if counts_before is not None:
            before = counts_before.filter((pl.col("row") == row) & (pl.col("cell") == cell))
            record["n_all"] = int(before["n"][0]) if before.height else 0
        answers = without_failures(part)
        metrics = three_class_metrics(answers["label"], answers["pred"])
        record.update({k: _nan_to_none(v) for k, v in metrics.items()})
        record["n_failed"] = part.height - answers.height
        record["score_source"] = _score_source(part)
        records.append(record)
    return pl.DataFrame(records, infer_schema_length=None)


def ci_table(
    preds: pl.DataFrame,
    split: str,
    rows: list[str],
    cells: list[str],
    pooled: bool,
    n_boot: int,
    seed: int,
) -> pl.DataFrame:
    """Long table of bootstrap 95% intervals: one line per (row, cell, metric)."""
    frames = []
    for row, cell, part in _groups(without_failures(preds), rows, cells, pooled):
        ci = bootstrap_three_class(part["label"], part["pred"], n_boot, seed)
        frames.append(
            ci.with_columns(
                split=pl.lit(split),
                kind=pl.lit("computed"),
                row=pl.lit(row),
                cell=pl.lit(cell),
                seed=pl.lit(seed),
                value=pl.col("value").fill_nan(None),
            )
        )
    columns = ["split", "kind", "row", "cell", "metric", "value", "lo", "hi", "n", "n_boot", "seed"]
    return pl.concat(frames).select(columns)


def _groups(preds: pl.DataFrame, rows: list[str], cells: list[str], pooled: bool):
    """(row, cell, de3 answers) for each row and cell line, and pooled (cell "all")."""
    answers = preds.filter(pl.col("task") == "de3")
    for row in rows:
        mine = answers.filter(pl.col("row") == row)
        if pooled:
            yield row, "all", mine.filter(pl.col("cell").is_in(cells))
        for cell in cells:
            yield row, cell, mine.filter(pl.col("cell") == cell)


def unseen_only(preds: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Predictions whose perturbation has no training row in any cell line of the split."""
    seen = splits.filter(pl.col("role") == "train").select("pert").unique()
    return preds.join(seen, on="pert", how="anti")


def reported_class_rows(reported: pl.DataFrame) -> pl.DataFrame:
    """Reported three-class numbers laid out like `three_class_table`."""
    if reported.height == 0:
        return pl.DataFrame()
    return (
        reported.pivot(
            on="metric",
            index=["split", "model", "cell", "paper", "source"],
            values="value",
            maintain_order=True,
        )
        .rename({"model": "row"})
        .with_columns(kind=pl.lit("reported"))
    )


# ---------------------------------------------------------------- assembling


def build(
    table: int,
    split: str,
    preds: pl.DataFrame,
    reported: pl.DataFrame,
    splits: pl.DataFrame | None,
    settings: Tables,
) -> dict[str, pl.DataFrame]:
    """The frames of one table: {"": table, "_ci": ..., "_unseen": ...} (3 and 4 only)."""
    rows = _row_order(preds, settings.rows)
    seed = settings.seed
    if table in (1, 2):
        computed = auroc_table(preds, "de3" if table == 1 else "dir", split, rows, seed)
        leading = ["split", "kind", "row", "score_source"]
        frame = _with_reported(computed, reported_auroc_rows(reported), leading)
        return {"": _cells_together(frame, leading)}
    if splits is None:
        raise CommandError(f"table {table} needs --splits-file (for the unseen-perturbation table)")
    if table == 4:
        if not split.endswith("_holdout"):
            raise CommandError(
                f"table 4 is the held-out cell line table; split {split!r} is not '<cell>_holdout'"
            )
        cells, pooled = [split.removesuffix("_holdout")], False
    else:
        cells, pooled = ordered_cells(preds), True
    n_boot = settings.bootstrap
    leading = ["split", "kind", "row", "cell", "n", "n_unparsed", "n_failed"]
    main = three_class_table(preds, split, rows, cells, pooled)
    unseen = unseen_only(preds, splits)
    before = pl.DataFrame(
        [{"row": r, "cell": c, "n": p.height} for r, c, p in _groups(preds, rows, cells, pooled)],
        schema={"row": pl.String, "cell": pl.String, "n": pl.Int64},
    )
    return {
        "": _with_reported(main, reported_class_rows(reported), leading),
        "_ci": ci_table(preds, split, rows, cells, pooled, n_boot, seed),
        "_unseen": three_class_table(unseen, split, rows, cells, pooled, counts_before=before),
    }


def _with_reported(
    computed: pl.DataFrame, reported: pl.DataFrame, leading: list[str]
) -> pl.DataFrame:
    """Computed rows, then reported rows, columns aligned; `paper` and `source` last."""
    frame = pl.concat([computed, reported], how="diagonal_relaxed") if reported.height else computed
    trailing = ["paper", "source"]
    frame = frame.with_columns(
        pl.lit(None, dtype=pl.String).alias(c) for c in trailing if c not in frame.columns
    )
    rest = [c for c in frame.columns if c not in leading and c not in trailing]
    return frame.select([c for c in leading if c in frame.columns] + rest + trailing)


def _cells_together(frame: pl.DataFrame, leading: list[str]) -> pl.DataFrame:
    """Keep each cell line's columns side by side (a reported-only column such as
    `K562_auroc_as_reported` joins its cell line instead of trailing the table)."""
    middle = [c for c in frame.columns if c not in leading and c not in ("paper", "source")]
    cells = list(dict.fromkeys(c.split("_", 1)[0] for c in middle))
    grouped = [c for cell in cells for c in middle if c.split("_", 1)[0] == cell]
    return frame.select([c for c in leading if c in frame.columns] + grouped + ["paper", "source"])


def _nan_to_none(value):
    return None if isinstance(value, float) and value != value else value


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, type=int, choices=(1, 2, 3, 4))
    parser.add_argument("--split", required=True, help="split name, e.g. default or rpe1_holdout")
    parser.add_argument(
        "--predictions",
        required=True,
        nargs="+",
        type=Path,
        help="results/predictions/{split}/{row}/{cell}[/{shard}].parquet files",
    )
    parser.add_argument(
        "--questions", required=True, type=Path, help="results/eval/{split}/questions.parquet"
    )
    parser.add_argument(
        "--splits-file", type=Path, help="results/data/splits/{split}.parquet (tables 3, 4)"
    )
    parser.add_argument(
        "--reported",
        type=Path,
        default=None,
        help="published numbers (default: packaged reported.csv)",
    )
    add_settings_arguments(parser, "tables")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="table CSV; tables 3/4 also write <stem>_ci.csv and <stem>_unseen.csv beside it",
    )


def main(args: argparse.Namespace) -> None:
    questions_path = Path(args.questions)
    if not questions_path.is_file():
        raise CommandError(f"questions file not found: {questions_path}")
    missing = [c for c in QUESTION_COLUMNS if c not in pl.read_parquet_schema(questions_path)]
    if missing:
        raise CommandError(f"questions file {questions_path} lacks columns {missing}")
    questions = pl.read_parquet(questions_path, columns=list(QUESTION_COLUMNS)).with_columns(
        pl.col("label").cast(pl.Int64)
    )
    preds = check_predictions(load_predictions(args.predictions), questions)
    reported = load_reported(args.reported or default_reported_path(), args.table)
    reported = reported.filter(pl.col("split") == args.split)
    splits = None
    if args.splits_file is not None:
        if not args.splits_file.is_file():
            raise CommandError(f"splits file not found: {args.splits_file}")
        splits = pl.read_parquet(args.splits_file, columns=["pert", "role"])
    settings = Tables.from_cli(args.settings, args.run)
    frames = build(args.table, args.split, preds, reported, splits, settings)
    out = Path(args.out)
    for suffix, frame in frames.items():
        path = out.with_name(f"{out.stem}{suffix}{out.suffix}")
        write_csv(frame, path)
        log.info("table %d: %d lines -> %s", args.table, frame.height, path)
