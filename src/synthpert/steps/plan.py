"""`synthpert plan`: what a run will still cost, before it runs.

For each paying step (traces, critic, the evaluation's model rows) and model, the plan
builds the very requests the step would send (llm.step_requests, evaluation.answers) and
leaves out those already answered in the step's request logs: only those are still to be
paid for. It counts their prompt tokens (llm.tokens: tiktoken for OpenAI models, the
local tokenizer otherwise, or an estimate, always named), expects as many completion
tokens per request as the same model and step produced on average in the existing logs
(else the configured `max_new_tokens`, an upper bound; the `completion_basis` column says
which), and prices them with the model's configured `price` (the Batch API's discount
where `batch_api` is on). A local model gets GPU-hours at its `tokens_per_second`
(configured, else measured from its request logs' timestamps).

The critic's requests depend on the traces: until a shard's traces are written, the plan
counts one request per sampled tuple (`count` says "at most") with the teacher's expected
completion as the reasoning's length. A critic endpoint that rejects structured outputs
is asked again in the tag format: those requests are not planned. Screens are not planned.
An evidence row's requests hold each question's evidence block (the split's evidence table),
and so do the evidence traces' and their critic's (row `with evidence`: the trace sample's
evidence table), when `synthpert_evidence` is trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from synthpert.core import paths, splits
from synthpert.core import rows as table_rows
from synthpert.core.config import load as load_config
from synthpert.core.io import write_csv
from synthpert.core.pricing import Price
from synthpert.core.settings import Model, for_step
from synthpert.errors import CommandError, ConfigError
from synthpert.evaluation.answers import build_requests, question_shard, with_evidence
from synthpert.llm.model import possible_identities, resolve_local_model
from synthpert.llm.requests import Request, answered_in, log_records
from synthpert.llm.step_requests import (
    critic_mode,
    critic_requests,
    generator_requests,
    trace_shard,
)
from synthpert.llm.tokens import TokenCounter, estimate, local_counter, openai_counter

log = logging.getLogger(__name__)

STEPS = ("traces", "critic", "evaluate")
EVIDENCE_TRACES = "with evidence"  # the `row` of the traces and critic lines of the evidence traces


@dataclass
class Job:
    """The requests of one job of a step (one request log)."""

    step: str
    model: str  # the models: name
    row: str  # the evaluation row ("" for traces and critic; EVIDENCE_TRACES for the evidence traces)
    requests: list[Request]
    log: Path
    exact: bool = True  # False: at most this many (the critic before its traces exist)
    extra_prompt_tokens: int = 0  # per request, added to the count (the critic's unknown reasoning)
    adapter: Path | None = None


@dataclass
class ModelView:
    """How the plan sees one model: what names its answers in the logs, and its token counter."""

    settings: Model
    counter: TokenCounter
    identities: dict[Path | None, set[str]] = field(default_factory=dict)  # by adapter
    counts: dict[Request, int] = field(default_factory=dict)  # rows asking the same questions count once

    def count(self, request: Request) -> int:
        if request not in self.counts:
            self.counts[request] = self.counter.count(request)
        return self.counts[request]


# --- the jobs of each step ---------------------------------------------------------------


def _read(path: Path, what: str) -> pl.DataFrame:
    if not path.is_file():
        raise CommandError(f"{what} {path} is missing; build it first (snakemake {path}), or ask for results/plan.csv")
    return pl.read_parquet(path)


def trace_sample(split: str, results: Path, evidence: bool) -> pl.DataFrame:
    """The split's trace sample, with each tuple's evidence block for the evidence traces."""
    sample = _read(paths.trace_sample(split, results), "the trace sample")
    if not evidence:
        return sample
    blocks = _read(paths.trace_evidence_table(split, results), "the trace sample's evidence table")
    return with_evidence(sample, blocks, "plan traces")


def trace_jobs(config: dict, results: Path, evidence: bool) -> list[Job]:
    """The teacher's requests (of the evidence traces with `evidence`)."""
    settings = for_step(config, "traces")
    row = EVIDENCE_TRACES if evidence else ""
    jobs = []
    for split in splits.splits(config):
        sample = trace_sample(split, results, evidence)
        for cell in splits.train_cells(config, split):
            for shard in range(settings.shards):
                log_path = paths.request_log_path(paths.trace_shard(split, cell, shard, results, evidence))
                rows = trace_shard(sample, cell, shard, settings.shards)
                jobs.append(Job("traces", config["traces"]["model"], row, generator_requests(rows, settings), log_path))
    return jobs


def critic_jobs(config: dict, results: Path, reasoning_tokens: float, evidence: bool) -> list[Job]:
    """Exact where the shard's traces exist, else one request per sampled tuple, at most."""
    settings = for_step(config, "critic_grade")
    mode = critic_mode(settings)
    row = EVIDENCE_TRACES if evidence else ""
    jobs = []
    for split in splits.splits(config):
        sample = trace_sample(split, results, evidence)
        for cell in splits.train_cells(config, split):
            for shard in range(config["traces"]["shards"]):
                traces = paths.trace_shard(split, cell, shard, results, evidence)
                graded_log = paths.request_log_path(paths.graded_shard(split, cell, shard, results, evidence))
                if traces.is_file():
                    todo = pl.read_parquet(traces).filter(pl.col("reasoning").is_not_null())
                    jobs.append(Job("critic", config["critic"]["model"], row, critic_requests(todo, settings, mode), graded_log))
                    continue
                rows = trace_shard(sample, cell, shard, config["traces"]["shards"])
                placeholders = critic_requests(rows.with_columns(reasoning=pl.lit("")), settings, mode)
                jobs.append(Job("critic", config["critic"]["model"], row, placeholders, graded_log, exact=False,
                                extra_prompt_tokens=round(reasoning_tokens)))  # fmt: skip
    return jobs


def evaluate_jobs(config: dict, results: Path) -> list[Job]:
    jobs = []
    for split in splits.splits(config):
        questions = _read(paths.questions(split, results), "the questions")
        evidence = None
        for row in config["evaluate"]["rows"]:
            if row not in table_rows.LLM_ROWS:
                continue
            if table_rows.uses_evidence(row) and evidence is None:
                evidence = _read(paths.evidence_table(split, results), "the evidence table")
            settings = for_step(config, "predict", row=row)
            adapter = paths.adapter_dir(split, row, results) if row in table_rows.ADAPTER_ROWS else None
            for cell in splits.test_cells(config, split):
                for shard in range(settings.shards):
                    asked = question_shard(questions, cell, shard, settings.shards)
                    if table_rows.uses_evidence(row):  # the longer prompts of the evidence rows
                        asked = with_evidence(asked, evidence, f"plan {row}")
                    requests = build_requests(asked, settings.generation, settings.model.local)
                    log_path = paths.request_log_path(paths.predictions(split, row, cell, shard, results))
                    jobs.append(Job("evaluate", table_rows.row_model_name(row, config), row, requests, log_path,
                                    adapter=adapter))  # fmt: skip
    return jobs


# --- models --------------------------------------------------------------------------------


def model_view(settings: Model) -> ModelView:
    """The token counter of a model, and (filled per adapter by `identities`) its identities."""
    if settings.backend == "openai":
        return ModelView(settings, openai_counter(settings.model))
    try:
        path = resolve_local_model(settings.model)
    except CommandError:
        return ModelView(settings, estimate(f"{settings.model} is not converted yet"))
    return ModelView(settings, local_counter(settings, path))


def identities(view: ModelView, adapter: Path | None) -> set[str]:
    """Every id the model's answers can carry in a request log: a local model's precision
    `auto` is bfloat16 on a GPU and float32 on a CPU, so both count. None for an adapter
    not trained yet, or a local model whose tokenizer cannot be loaded here."""
    if adapter not in view.identities:
        spec = view.settings
        unnamed = spec.local and (
            view.counter.name.startswith("estimate") or (adapter is not None and not (adapter / "adapter_config.json").is_file())
        )
        view.identities[adapter] = set() if unnamed else possible_identities(spec, adapter)
    return view.identities[adapter]


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    answered: int = 0
    to_send: int = 0
    prompt_tokens: int = 0
    max_new_tokens: int = 0  # summed over the requests to send
    exact: bool = True
    logged: list[dict] = field(default_factory=list)  # log lines of this model's answers


def tally(jobs: list[Job], view: ModelView) -> Tally:
    total = Tally()
    for job in jobs:
        ids = identities(view, job.adapter)
        records = log_records(job.log)  # one read, read-only: jobs may be appending
        # A transient failure is not final: it is asked again, so still to pay.
        for request, answered in answered_in(job.requests, ids, records):
            total.requests += 1
            if answered:
                total.answered += 1
                continue
            total.to_send += 1
            total.prompt_tokens += view.count(request) + job.extra_prompt_tokens
            total.max_new_tokens += request.max_new_tokens
        total.exact &= job.exact
        total.logged += [{**r, "_log": str(job.log)} for r in records if r.get("model") in ids]
    return total


def tokens_per_second(view: ModelView, logged: list[dict]) -> tuple[float | None, str]:
    """Configured, else generated tokens over the time between the first and last answer
    of each log (the first answer's tokens left out: their time is not in that span)."""
    if view.settings.tokens_per_second:
        return view.settings.tokens_per_second, "configured"
    by_log: dict[str, list[dict]] = {}
    for record in logged:
        by_log.setdefault(record.get("_log", ""), []).append(record)
    tokens = seconds = 0.0
    for records in by_log.values():
        records.sort(key=lambda r: r["time"])
        if len(records) > 1 and records[-1]["time"] > records[0]["time"]:
            tokens += sum(r["completion_tokens"] for r in records[1:])
            seconds += records[-1]["time"] - records[0]["time"]
    if tokens and seconds:
        return tokens / seconds, "measured from the request logs"
    return None, "unknown: set tokens_per_second"


def plan_row(step: str, name: str, row: str, jobs: list[Job], view: ModelView, budget: float | None) -> dict:
    t = tally(jobs, view)
    answers = [r for r in t.logged if r.get("finish_reason") != "error"]
    if answers:
        per_request = sum(r["completion_tokens"] for r in answers) / len(answers)
        basis = f"measured: mean of {len(answers)} answers"
        cached_share = sum(r.get("cached_tokens", 0) for r in answers) / max(1, sum(r["prompt_tokens"] for r in answers))
    else:
        per_request, cached_share = t.max_new_tokens / max(1, t.to_send), 0.0
        basis = "max_new_tokens (upper bound)"
    completion = per_request * t.to_send
    spec = view.settings
    out = {
        "step": step, "model": name, "row": row, "backend": spec.backend, "model_id": spec.model,
        "requests": t.requests, "answered": t.answered, "to_send": t.to_send,
        "count": "exact" if t.exact else "at most (traces not written yet)",
        "prompt_tokens": t.prompt_tokens, "token_counter": view.counter.name,
        "completion_tokens_per_request": round(per_request, 1), "completion_basis": basis,
        "completion_tokens": round(completion),
        "batch_api": spec.batch_api if spec.backend == "openai" else None,
        "usd": None, "spent_usd": None, "budget_usd": budget, "price_date": None, "price_source": None,
        "tokens_per_second": None, "gpu_hours": None,
    }  # fmt: skip
    price = Price.of(spec.price) if spec.backend == "openai" else None
    if price is not None:
        batch = spec.batch_api
        out["usd"] = price.usd(t.prompt_tokens, completion, t.prompt_tokens * cached_share, batch)
        out["spent_usd"] = sum(
            price.usd(r["prompt_tokens"], r["completion_tokens"], r.get("cached_tokens", 0), batch) for r in t.logged
        )
        out["price_date"], out["price_source"] = price.date, price.source
    elif spec.backend != "openai":
        rate, rate_basis = tokens_per_second(view, t.logged)
        out["tokens_per_second"] = f"{rate:.1f} ({rate_basis})" if rate else rate_basis
        out["gpu_hours"] = completion / rate / 3600 if rate else None
    return out


def build_plan(config: dict, results: Path) -> pl.DataFrame:
    views: dict[str, ModelView] = {}

    def view_of(name: str) -> ModelView:
        if name not in views:
            views[name] = model_view(Model.of(config["models"][name]))
        return views[name]

    records = []
    teacher, critic = config["traces"]["model"], config["critic"]["model"]
    for evidence in table_rows.trace_kinds(config):
        row = EVIDENCE_TRACES if evidence else ""
        traces = plan_row("traces", teacher, row, trace_jobs(config, results, evidence), view_of(teacher),
                          config["traces"]["budget_usd"])  # fmt: skip
        jobs = critic_jobs(config, results, traces["completion_tokens_per_request"], evidence)
        records += [traces, plan_row("critic", critic, row, jobs, view_of(critic), config["critic"]["budget_usd"])]
    evaluate = evaluate_jobs(config, results)
    for row in dict.fromkeys(job.row for job in evaluate):
        name = table_rows.row_model_name(row, config)
        row_jobs = [j for j in evaluate if j.row == row]
        records.append(plan_row("evaluate", name, row, row_jobs, view_of(name), config["evaluate"]["budget_usd"]))
    return pl.DataFrame(records, infer_schema_length=None)


# --- the summary -----------------------------------------------------------------------------


def summary(plan: pl.DataFrame, config: dict) -> str:
    lines = ["step      model (row)             to send / requests   prompt tok   completion tok (per request, basis)        USD or GPU-h"]
    for r in plan.iter_rows(named=True):
        who = r["model"] + (f" ({r['row']})" if r["row"] else "")
        cost = f"${r['usd']:,.2f}" if r["usd"] is not None else (f"{r['gpu_hours']:.2f} GPU-h" if r["gpu_hours"] is not None else "-")
        most = "" if r["count"] == "exact" else " at most"
        lines.append(
            f"{r['step']:<9} {who:<23} {r['to_send']:>7,} / {r['requests']:<7,}{most} {r['prompt_tokens']:>12,}   "
            f"{r['completion_tokens']:>12,} ({r['completion_tokens_per_request']:g}, {r['completion_basis']})   {cost}"
        )
    priced = plan.filter(pl.col("usd").is_not_null())
    if priced.height:
        lines.append(f"total still to pay: ${priced['usd'].sum():,.2f} (already paid per the logs: ${priced['spent_usd'].sum():,.2f})")
    counters = sorted({f"{r['model']}: {r['token_counter']}" for r in plan.iter_rows(named=True)})
    prices = sorted({f"{r['model']}: {r['price_date']}, {r['price_source']}" for r in priced.iter_rows(named=True)})
    lines += ["prompt tokens counted with " + "; ".join(counters)]
    if prices:
        lines += ["prices as configured (" + "; ".join(prices) + ")" + ("; Batch API discount applied" if any(priced["batch_api"]) else "")]
    budgets = {s: config[s]["budget_usd"] for s in STEPS if config[s]["budget_usd"] is not None}
    if config["budget"]["usd"] is not None:
        budgets["run"] = config["budget"]["usd"]
    lines.append("budgets: " + (", ".join(f"{k} ${v:,.2f}" for k, v in budgets.items()) if budgets else "none set"))
    return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--configfile", type=Path, help="configuration file (YAML)")
    source.add_argument("--config-json", help="the configuration as the workflow validated and completed it, as JSON (the rule)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="the workflow's results folder")
    parser.add_argument("--out", type=Path, default=None, help="write the plan as CSV here")


def main(args: argparse.Namespace) -> None:
    try:
        config = load_config(args.configfile) if args.configfile else json.loads(args.config_json)
    except ConfigError as err:
        raise CommandError(f"invalid configuration: {err}") from None
    plan = build_plan(config, args.results)
    if args.out is not None:
        write_csv(plan, args.out)
    print(summary(plan, config), file=sys.stdout, flush=True)
