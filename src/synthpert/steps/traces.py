"""Step 2: a teacher LLM writes reasoning traces for a seeded sample of training tuples.

`synthpert traces sample` draws the tuples once per split (pooled over cell lines, the
paper's 15 % with seed 88) and deals them into shards per cell line; `synthpert traces
run` asks the teacher about one (cell line, shard). The draw does not depend on the
number of shards, so changing `traces.shards` re-deals the same tuples.

With `--evidence` (the `synthpert_evidence` variant, docs/evidence.md) the teacher is
shown each tuple's evidence block after the query; the block is kept in the trace's
`evidence` column, so the critic and the SFT set use the very text the teacher saw.

Every answer is kept in an append-only request log beside the output (not a Snakemake
output, so it survives a failed job): a rerun sends only what the log lacks, and a run
stopped by the spending guard resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import atomic_path, write_parquet
from synthpert.core.labels import CLASS_KEYS, class_probabilities
from synthpert.core.prompts import parse_answer, parse_reasoning
from synthpert.core.sampling import balanced, sample_size
from synthpert.core.settings import Sample, Traces, TraceSample
from synthpert.errors import CommandError
from synthpert.evaluation.answers import with_evidence
from synthpert.llm.backends import make_backend
from synthpert.llm.budget import spending_guard
from synthpert.core.paths import request_log_path
from synthpert.llm.requests import RequestLog, run_requests
from synthpert.llm.step_requests import generator_requests, trace_shard

log = logging.getLogger(__name__)

TUPLE = ["cell", "pert", "gene"]
TRACE_SCHEMA = {
    "tid": pl.String,
    "cell": pl.String,
    "pert": pl.String,
    "gene": pl.String,
    "label": pl.Int8,
    "reasoning": pl.String,
    "answer": pl.Int8,
    "status": pl.String,
    "finish_reason": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "correct": pl.Boolean,
    **{f"prob_{CLASS_KEYS[c]}": pl.Float64 for c in sorted(CLASS_KEYS)},
    "raw_text": pl.String,
    "evidence": pl.String,  # the block the teacher was shown (null: the paper's prompt)
}


# --- request logs -------------------------------------------------------------------


def usage_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".parquet") + ".usage.json")


# --- sample --------------------------------------------------------------------------


def tid_expr() -> pl.Expr:
    """Stable id of a training tuple."""
    return pl.concat_str(TUPLE, separator=":")


def draw_sample(split_df: pl.DataFrame, sample: Sample, shards: int) -> pl.DataFrame:
    """Seeded sample of the pooled training rows, dealt into `shards` per cell line.

    Rows are sorted before drawing, so the draw depends on the data and the seed only;
    shards are dealt round-robin in `tid` order within each cell line, so they are
    balanced and the sampled tuples do not depend on `shards`.
    """
    if shards < 1:
        raise CommandError(f"traces.shards must be >= 1, got {shards}")
    missing = [c for c in [*TUPLE, "label", "role"] if c not in split_df.columns]
    if missing:
        raise CommandError(f"the split table lacks column(s) {missing}; found {split_df.columns}")
    train = split_df.filter(pl.col("role") == "train").sort(TUPLE)
    if train.height == 0:
        raise CommandError("the split has no training rows (role == 'train')")
    size = sample_size(train.height, sample)
    if size == 0:
        raise CommandError(f"traces.sample {sample} selects no tuple out of {train.height} training rows")
    if sample.count is not None and sample.count > train.height:
        log.warning("traces.sample.count = %d but only %d training rows: taking all", sample.count, train.height)
    seed = sample.seed
    if sample.balanced:
        picked = balanced(train, "label", size, seed)
    else:
        picked = train.sample(size, seed=seed) if size < train.height else train
    return (
        picked.with_columns(tid_expr().alias("tid"))
        .sort("cell", "tid")
        .with_columns((pl.int_range(pl.len()).over("cell") % shards).cast(pl.Int32).alias("shard"))
        .select("tid", *[c for c in picked.columns if c != "role"], "shard")
    )


# --- run -----------------------------------------------------------------------------


def scored_reasoning(text: str) -> str | None:
    """Reasoning of an option-scored answer: what the scores were conditioned on, i.e.
    the text before `<answer>`, with a `<think>` the model left open closed (a model
    that ended its turn inside `<think>` has finished its reasoning)."""
    head = text.split("<answer>")[0]
    if "<think>" in head and "</think>" not in head:
        head += "</think>"
    return parse_reasoning(head)


def trace_record(row: dict, response) -> dict:
    """One output row from a tuple and its teacher response."""
    probs: dict[int, float] = {}
    reasoning = None
    if response.failed:  # a permanent failure (transient ones stop the step): never kept
        answer, status = None, "error"
    elif response.option_logprobs:
        probs = class_probabilities(response.option_logprobs)
        answer = max(probs, key=probs.get)
        if response.finish_reason == "length":  # cut off: the reasoning is incomplete
            status, reasoning = "truncated", parse_reasoning(response.text)
        else:
            status, reasoning = "answered", scored_reasoning(response.text)
    else:
        answer, status = parse_answer(response.text, response.finish_reason)
        reasoning = parse_reasoning(response.text)
    return {
        "tid": row["tid"],
        "cell": row["cell"],
        "pert": row["pert"],
        "gene": row["gene"],
        "label": row["label"],
        "reasoning": reasoning,
        "answer": answer,
        "status": status,
        "finish_reason": response.finish_reason,
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "correct": answer == row["label"],
        **{f"prob_{CLASS_KEYS[c]}": probs.get(c) for c in sorted(CLASS_KEYS)},
        "raw_text": response.text,
        "evidence": row.get("evidence"),
    }


def run_shard(
    sample: pl.DataFrame, cell: str, shard: int, settings: Traces, out: Path, backend, evidence: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Ask the teacher (`backend`, unused for an empty shard) about one shard, showing each
    tuple's block of the `evidence` table if one is given; write the traces and the usage
    beside them."""
    rows = shard_rows(sample, cell, shard, settings, evidence)
    requests = generator_requests(rows, settings)
    records = []
    with RequestLog(request_log_path(out)) as request_log:
        guard = spending_guard(settings.model, settings.budget, request_log.path, settings.max_requests, settings.max_tokens)
        if requests:  # an empty shard needs no model
            responses = run_requests(backend, requests, request_log, guard, f"traces {cell} shard {shard}")
            records = [trace_record(row, resp) for row, resp in zip(rows.iter_rows(named=True), responses, strict=True)]
        usage = {"model": settings.model.model, "cell": cell, "shard": shard, "tuples": rows.height, **request_log.usage()}
    df = pl.DataFrame(records, schema=TRACE_SCHEMA)
    with atomic_path(usage_path(out)) as tmp:
        tmp.write_text(json.dumps(usage, indent=2) + "\n")
    write_parquet(df, out)
    return df


def shard_rows(
    sample: pl.DataFrame, cell: str, shard: int, settings: Traces, evidence: pl.DataFrame | None
) -> pl.DataFrame:
    """The tuples of one shard, with their evidence blocks when an evidence table is given."""
    rows = trace_shard(sample, cell, shard, settings.shards)
    return rows if evidence is None else with_evidence(rows, evidence, f"traces {cell} shard {shard}")


# --- CLI -----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sample = sub.add_parser("sample", help="seeded sample of a split's training tuples, dealt into shards")
    sample.add_argument("--split-file", required=True, type=Path, help="results/data/splits/<split>.parquet")
    add_settings_arguments(sample, "trace_sample")
    sample.add_argument("--out", required=True, type=Path, help="output: sample.parquet")
    run = sub.add_parser("run", help="the teacher writes the traces of one (cell line, shard)")
    run.add_argument("--sample", required=True, type=Path, help="sample.parquet of `traces sample`")
    run.add_argument("--cell", required=True)
    run.add_argument("--shard", required=True, type=int)
    add_settings_arguments(run, "traces")
    run.add_argument("--evidence", type=Path, default=None,
                     help="evidence table of the sampled tuples (results/evidence/{split}.traces.parquet): "
                     "the teacher is shown each tuple's block")
    run.add_argument("--out", required=True, type=Path, help="output: <shard>.parquet (+ .usage.json beside it)")


def _read(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise CommandError(f"{path}: file not found")
    return pl.read_parquet(path)


def main(args) -> None:
    if args.action == "sample":
        settings = TraceSample.from_cli(args.settings, args.run)
        df = draw_sample(_read(args.split_file), settings.sample, settings.shards)
        write_parquet(df, args.out)
        counts = df.group_by("cell", "shard").len().sort("cell", "shard")
        log.info("%d tuples sampled\n%s", df.height, counts)
        return
    settings = Traces.from_cli(args.settings, args.run)
    if not args.out.name.endswith(".parquet"):
        raise CommandError(f"--out must end in .parquet, got {args.out}")
    sample = _read(args.sample)
    evidence = _read(args.evidence) if args.evidence is not None else None
    rows = shard_rows(sample, args.cell, args.shard, settings, evidence)  # fail fast, before loading a model
    backend = make_backend(settings.model) if rows.height else None
    df = run_shard(sample, args.cell, args.shard, settings, args.out, backend, evidence)
    counts = df.group_by("status").agg(pl.len(), pl.col("correct").sum()).sort("status")
    log.info("%d traces written to %s\n%s", df.height, args.out, counts)
