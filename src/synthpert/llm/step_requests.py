"""The requests the teacher and the critic are sent, built in one place so that the steps
that send them (`traces`, `critic`) and `synthpert plan`, which counts them, agree."""

from __future__ import annotations

import logging

import polars as pl

from synthpert.core.labels import check_cells
from synthpert.core.prompts import (
    APPROACHES,
    CRITIC_RESPONSE_FORMAT,
    GRADES,
    answer_options,
    critic_messages,
    generator_messages,
)
from synthpert.core.settings import CriticGrade, Traces
from synthpert.errors import CommandError
from synthpert.llm.requests import Request

log = logging.getLogger(__name__)


def trace_shard(sample: pl.DataFrame, cell: str, shard: int, shards: int) -> pl.DataFrame:
    """The tuples of one (cell line, shard). A known cell line without sampled tuples has
    empty shards (a small pooled sample may miss one), so a fixed grid of jobs completes."""
    cells = sorted(sample["cell"].unique().to_list())
    if cell not in cells:
        check_cells([cell])
        log.warning("cell line %s has no tuple in the trace sample (it has %s): empty shard", cell, cells)
    if not 0 <= shard < shards:
        raise CommandError(f"shard {shard} is outside 0..{shards - 1} (traces.shards = {shards})")
    if sample["shard"].max() >= shards:
        raise CommandError(
            f"the sample was dealt into more shards than traces.shards = {shards}; rerun `synthpert traces sample`"
        )
    return sample.filter((pl.col("cell") == cell) & (pl.col("shard") == shard))


def generator_requests(rows: pl.DataFrame, settings: Traces) -> list[Request]:
    """One teacher request per tuple (with its evidence block where `rows` has an `evidence`
    column). A local model starts inside `<think>` and its answer is the likeliest of the
    three labels, so it always yields one."""
    if settings.approach not in APPROACHES:
        raise CommandError(f"traces.approach must be one of {APPROACHES}, got {settings.approach!r}")
    local = settings.model.local
    extra = {"prefill": "<think>\n", "options": answer_options(), "option_tag": "answer"} if local else {}
    return [
        Request(
            messages=generator_messages(
                row["cell"], row["pert"], row["gene"], row["label"], settings.approach, row.get("evidence")
            ),
            tag=row["tid"],
            **settings.generation.request_fields(),
            **extra,
        )
        for row in rows.iter_rows(named=True)
    ]


def critic_mode(settings: CriticGrade) -> str:
    """How the critic answers: `options` (a local model scores the five grades), `json`
    (structured outputs) or `tags` (the paper's `<evaluation>` tag)."""
    if settings.model.local:
        return "options"
    return "json" if settings.structured_outputs else "tags"


def critic_requests(rows: pl.DataFrame, settings: CriticGrade, mode: str) -> list[Request]:
    """One critic request per trace (with the block the teacher saw, if any). mode: `json` (structured outputs), `tags` (the
    paper's `<evaluation>` format) or `options` (local: score the five grades only)."""
    params = settings.generation.request_fields()
    if mode == "options":
        params.update(max_new_tokens=0, options=GRADES, option_tag="evaluation")
    elif mode == "json":
        params["response_format"] = CRITIC_RESPONSE_FORMAT
    output = "json" if mode == "json" else "tags"
    return [
        Request(
            messages=critic_messages(row["cell"], row["pert"], row["gene"], row["reasoning"], output, row.get("evidence")),
            tag=row["tid"],
            **params,
        )
        for row in rows.iter_rows(named=True)
    ]
