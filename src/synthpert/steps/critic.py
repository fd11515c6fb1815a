"""Step 3: a critic LLM grades each trace's reasoning; the good ones become the SFT sets.

`synthpert critic grade` grades one shard of traces. The critic sees the question and the
reasoning only, never the label or the teacher's answer (paper Appendix C). An
OpenAI-compatible critic answers a strict JSON schema whose `grade` is one of the five
grades when the endpoint supports structured outputs, else the paper's `<evaluation>`
tag; a local critic does not generate at all: its grade is the likeliest of the five
grades after `<evaluation>`, so it is never unparseable.

`synthpert critic select` pools the graded shards of a split and keeps a trace when its
grade is in `critic.keep_grades` and the teacher answered the true label (an answer
of "I do not know", an unparsed one or a cut-off one is never kept). It writes the
training sets of the `synthpert`, `sft_data` (the same tuples, answer alone) and
optionally `synthpert_balanced` variants, and the statistics of the filter. With
`--evidence` it pools the traces written with evidence blocks instead, and writes the
`synthpert_evidence` set (each prompt holds the block the teacher was shown) and its own
statistics (`critic_stats_evidence.csv`, `grades_evidence.csv`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import polars as pl

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import write_csv, write_parquet
from synthpert.core.labels import CLASS_NAMES
from synthpert.core.prompts import (
    GRADES,
    answer_only_target,
    assistant_target,
    parse_grade,
    question_messages,
)
from synthpert.core.sampling import balanced
from synthpert.core.settings import CriticGrade, CriticSelect
from synthpert.errors import CommandError
from synthpert.llm.backends import make_backend
from synthpert.llm.budget import spending_guard
from synthpert.core.paths import request_log_path
from synthpert.llm.requests import RequestLog, Response, run_requests
from synthpert.llm.step_requests import critic_mode, critic_requests

log = logging.getLogger(__name__)

GRADE_COLUMNS = {
    "grade": pl.String,
    "grade_logprobs": pl.String,
    "critic_finish_reason": pl.String,
    "critic_prompt_tokens": pl.Int64,
    "critic_completion_tokens": pl.Int64,
}
NEEDED = ["tid", "cell", "pert", "gene", "label", "reasoning", "answer", "status", *GRADE_COLUMNS]
SFT_SCHEMA = {
    "tid": pl.String,
    "cell": pl.String,
    "pert": pl.String,
    "gene": pl.String,
    "label": pl.Int8,
    "grade": pl.String,
    "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
}
_NO_SCHEMA = re.compile(r"^http 4(00|22)\b|response_format|json_schema|structured output|not supported", re.IGNORECASE)


# --- grade ---------------------------------------------------------------------------


def structured_unsupported(response: Response) -> bool:
    """The endpoint rejected the request, most likely for its `response_format`."""
    return response.finish_reason == "error" and bool(_NO_SCHEMA.search(response.error or ""))


def grade_record(response: Response | None) -> dict:
    """Grade columns of one trace (all null for a trace without reasoning)."""
    if response is None:
        return dict.fromkeys(GRADE_COLUMNS)
    if response.option_logprobs:
        grade = max(response.option_logprobs, key=response.option_logprobs.get)
        logprobs = json.dumps(response.option_logprobs)
    else:
        grade = parse_grade(response.text) if not response.failed else None  # a failure grades nothing
        logprobs = None
    return {
        "grade": grade,
        "grade_logprobs": logprobs,
        "critic_finish_reason": response.finish_reason,
        "critic_prompt_tokens": response.prompt_tokens,
        "critic_completion_tokens": response.completion_tokens,
    }


def grade_traces(traces: pl.DataFrame, settings: CriticGrade, out: Path, backend) -> pl.DataFrame:
    """Grade every trace with a reasoning (`backend` is unused when none has one); write
    traces + grade columns to `out`."""
    missing = [c for c in ["tid", "cell", "pert", "gene", "reasoning"] if c not in traces.columns]
    if missing:
        raise CommandError(f"the traces table lacks column(s) {missing}; found {traces.columns}")
    todo = traces.filter(pl.col("reasoning").is_not_null())
    mode = critic_mode(settings)
    requests = critic_requests(todo, settings, mode)
    by_tid = {}
    with RequestLog(request_log_path(out)) as request_log:
        guard = spending_guard(settings.model, settings.budget, request_log.path)
        if requests:
            responses = run_requests(backend, requests, request_log, guard, f"critic ({mode})")
            by_tid = {req.tag: resp for req, resp in zip(requests, responses, strict=True)}
        rejected = [tid for tid, resp in by_tid.items() if structured_unsupported(resp)] if mode == "json" else []
        if rejected:
            log.warning(
                "%d critic requests with a JSON schema were rejected (%s); asking them again with the "
                "paper's <evaluation> tag format",
                len(rejected),
                by_tid[rejected[0]].error,
            )
            retry = critic_requests(todo.filter(pl.col("tid").is_in(rejected)), settings, "tags")
            answers = run_requests(backend, retry, request_log, guard, "critic (tags)")
            by_tid.update({req.tag: resp for req, resp in zip(retry, answers, strict=True)})
    grades = pl.DataFrame(
        [{"tid": tid, **grade_record(by_tid.get(tid))} for tid in traces["tid"]],
        schema={"tid": pl.String, **GRADE_COLUMNS},
    )
    graded = traces.drop([c for c in GRADE_COLUMNS if c in traces.columns]).join(
        grades, on="tid", how="left", maintain_order="left"
    )
    write_parquet(graded, out)
    return graded


# --- select --------------------------------------------------------------------------


def kept_expr(keep_grades: list[str]) -> pl.Expr:
    """A trace is kept when its grade passes and the teacher answered the true label."""
    return (
        pl.col("grade").is_in(keep_grades)
        & (pl.col("status") == "answered")
        & (pl.col("answer") == pl.col("label"))
        & pl.col("reasoning").is_not_null()
    ).fill_null(False)


def sft_table(kept: pl.DataFrame, with_reasoning: bool) -> pl.DataFrame:
    """Conversational SFT rows: the evaluation prompt (with the trace's evidence block, if
    it has one), then the assistant's target."""
    rows = []
    for row in kept.sort("tid").iter_rows(named=True):
        target = (
            assistant_target(row["reasoning"], row["label"]) if with_reasoning else answer_only_target(row["label"])
        )
        question = question_messages(row["cell"], row["pert"], row["gene"], evidence=row.get("evidence"))
        messages = [*question, ("assistant", target)]
        rows.append(
            {
                **{c: row[c] for c in ["tid", "cell", "pert", "gene", "label", "grade"]},
                "messages": [{"role": role, "content": content} for role, content in messages],
            }
        )
    return pl.DataFrame(rows, schema=SFT_SCHEMA)


def balanced_kept(kept: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Kept rows downsampled so each class is a third (seeded); every class must be kept."""
    counts = {cls: kept.filter(pl.col("label") == cls).height for cls in CLASS_NAMES}
    empty = [CLASS_NAMES[c] for c, n in counts.items() if n == 0]
    if empty:
        shown = {CLASS_NAMES[c]: n for c, n in counts.items()}
        raise CommandError(
            f"synthpert_balanced needs kept traces of every class, but none are kept for {empty} "
            f"(kept per class: {shown}); sample more tuples, keep more grades, or drop the variant"
        )
    return balanced(kept.sort("tid"), "label", len(counts) * min(counts.values()), seed).sort("tid")


def critic_stats(graded: pl.DataFrame, kept: pl.Series) -> pl.DataFrame:
    """Tidy table of the filter: `dimension, value, n, kept, kept_fraction`. Dimensions
    `all`, `grade` (null = not graded), `class`, `cell`, `status` count traces;
    `tokens` rows count tokens (n = all traces, kept = the kept ones)."""
    df = graded.with_columns(
        kept.alias("kept"),
        pl.col("grade").fill_null("not graded"),
        pl.col("label").replace_strict(CLASS_NAMES, return_dtype=pl.String).alias("class"),
    )
    parts = []
    for dimension in ["all", "grade", "class", "cell", "status"]:
        value = pl.lit("all") if dimension == "all" else pl.col(dimension).cast(pl.String)
        parts.append(
            df.group_by(value.alias("value"))
            .agg(pl.len().alias("n"), pl.col("kept").sum().alias("kept"))
            .sort("value")
            .select(pl.lit(dimension).alias("dimension"), "value", "n", "kept")
        )
    token_columns = {
        "teacher_prompt": "prompt_tokens",
        "teacher_completion": "completion_tokens",
        "critic_prompt": "critic_prompt_tokens",
        "critic_completion": "critic_completion_tokens",
    }
    parts.append(
        pl.DataFrame(
            [
                {
                    "dimension": "tokens",
                    "value": name,
                    "n": int(df[column].fill_null(0).sum()),
                    "kept": int(df.filter("kept")[column].fill_null(0).sum()),
                }
                for name, column in token_columns.items()
                if column in df.columns
            ],
            schema={"dimension": pl.String, "value": pl.String, "n": pl.Int64, "kept": pl.Int64},
        )
    )
    stats = pl.concat([p.with_columns(pl.col("n", "kept").cast(pl.Int64)) for p in parts])
    return stats.with_columns((pl.col("kept") / pl.col("n")).alias("kept_fraction"))


def grade_counts(graded: pl.DataFrame, kept: pl.Series) -> pl.DataFrame:
    """Traces per (cell line, grade), every grade listed, for the report's plot."""
    grid = pl.DataFrame({"cell": sorted(graded["cell"].unique().to_list())}).join(
        pl.DataFrame({"grade": list(GRADES)}), how="cross"
    )
    counts = (
        graded.with_columns(kept.alias("kept"))
        .filter(pl.col("grade").is_not_null())
        .group_by("cell", "grade")
        .agg(pl.len().alias("n"), pl.col("kept").sum().alias("kept"))
    )
    return grid.join(counts, on=["cell", "grade"], how="left").with_columns(pl.col("n", "kept").fill_null(0))


def read_graded(paths: list[Path]) -> pl.DataFrame:
    frames = []
    for path in paths:
        if not path.is_file():
            raise CommandError(f"{path}: file not found")
        df = pl.read_parquet(path)
        missing = [c for c in NEEDED if c not in df.columns]
        if missing:
            raise CommandError(f"{path}: not a graded traces table, missing column(s) {missing}")
        frames.append(df)
    graded = pl.concat(frames, how="diagonal_relaxed")
    dup = graded.filter(pl.col("tid").is_duplicated())["tid"].unique().to_list()
    if dup:
        raise CommandError(f"{len(dup)} traces appear in several --grades files (e.g. {dup[:3]}); pass each shard once")
    return graded


def shown_evidence(graded: pl.DataFrame, evidence: bool) -> None:
    """The traces were written with evidence blocks exactly when `--evidence` says so: every
    one of them, or none."""
    shown = graded["evidence"].is_not_null().sum() if "evidence" in graded.columns else 0
    if evidence and shown < graded.height:
        raise CommandError(
            f"--evidence: {graded.height - shown} of {graded.height} traces were written without an evidence block; "
            "pass the shards of the evidence traces (results/traces/SPLIT/evidence/...)"
        )
    if not evidence and shown:
        raise CommandError(
            f"{shown} of {graded.height} traces were written with an evidence block: select them with --evidence"
        )


def select(graded: pl.DataFrame, split: str, settings: CriticSelect, out_dir: Path, evidence: bool = False) -> pl.DataFrame:
    """Write the SFT sets and the statistics of one split (of the evidence traces with
    `evidence`); return the kept traces."""
    shown_evidence(graded, evidence)
    keep_grades = list(settings.keep_grades)
    kept_mask = graded.select(kept_expr(keep_grades).alias("kept"))["kept"]
    kept = graded.filter(kept_mask)
    if kept.height == 0:
        with pl.Config(tbl_rows=30, tbl_hide_dataframe_shape=True):
            counts = graded.group_by("grade", "status").len().sort("grade", "status", nulls_last=True)
        raise CommandError(
            f"split {split!r}: no trace is kept (keep_grades {keep_grades}, status answered, answer == label) "
            f"out of {graded.height}; grades and statuses:\n{counts}"
        )
    if evidence:
        outputs = {"synthpert_evidence.parquet": sft_table(kept, with_reasoning=True)}
    else:
        outputs = {
            "synthpert.parquet": sft_table(kept, with_reasoning=True),
            "sft_data.parquet": sft_table(kept, with_reasoning=False),
        }
        if settings.balanced:
            outputs["synthpert_balanced.parquet"] = sft_table(balanced_kept(kept, settings.seed), with_reasoning=True)
    stats = critic_stats(graded, kept_mask)
    suffix = "_evidence" if evidence else ""
    for name, df in outputs.items():
        write_parquet(df, out_dir / name)
    write_csv(stats, out_dir / f"critic_stats{suffix}.csv")
    write_csv(grade_counts(graded, kept_mask), out_dir / f"grades{suffix}.csv")
    log.info("split %s: %d of %d traces kept\n%s", split, kept.height, graded.height, stats)
    return kept


# --- CLI -----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    grade = sub.add_parser("grade", help="the critic grades the traces of one shard")
    grade.add_argument("--traces", required=True, type=Path, help="<shard>.parquet of `traces run`")
    add_settings_arguments(grade, "critic_grade")
    grade.add_argument("--out", required=True, type=Path, help="output: graded traces (.parquet)")
    choose = sub.add_parser("select", help="keep the well-graded, correct traces of a split as SFT sets")
    choose.add_argument("--grades", required=True, nargs="+", type=Path, help="graded shards of one split")
    choose.add_argument("--split", required=True, help="split name (for messages)")
    add_settings_arguments(choose, "critic_select")
    choose.add_argument("--evidence", action="store_true",
                        help="the traces were written with evidence blocks: write the synthpert_evidence set")
    choose.add_argument("--out-dir", required=True, type=Path, help="output folder")


def main(args) -> None:
    if args.action == "select":
        settings = CriticSelect.from_cli(args.settings, args.run)
        select(read_graded(args.grades), args.split, settings, args.out_dir, args.evidence)
        return
    settings = CriticGrade.from_cli(args.settings, args.run)
    if not args.out.name.endswith(".parquet"):
        raise CommandError(f"--out must end in .parquet, got {args.out}")
    if not args.traces.is_file():
        raise CommandError(f"{args.traces}: file not found")
    traces = pl.read_parquet(args.traces)
    needed = "reasoning" in traces.columns and traces["reasoning"].is_not_null().any()
    backend = make_backend(settings.model) if needed else None  # nothing to grade: no model
    graded = grade_traces(traces, settings, args.out, backend)
    counts = graded.group_by("grade").len().sort("grade", nulls_last=True)
    log.info("%d traces graded into %s\n%s", graded["grade"].is_not_null().sum(), args.out, counts)
