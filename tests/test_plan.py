"""`synthpert plan`: what a run will still send and cost. On a cut-down demo through the
real Snakemake, the plan's request counts equal what the steps then send, and a plan made
after the run has nothing left to pay; with an API model, answers in the logs are not
counted again, completions are measured from them and priced as configured."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import demo_config, step_settings
from test_rerun import small_config

from synthpert.core.pricing import Price
from synthpert.core.settings import Sample
from synthpert.llm.model import api_identity
from synthpert.llm.requests import RequestLog, Response
from synthpert.llm.step_requests import generator_requests, trace_shard
from synthpert.steps.plan import build_plan, summary
from synthpert.steps.questions import select_questions
from synthpert.steps.traces import draw_sample

REPO = Path(__file__).resolve().parents[1]
PRICE = {"input": 1.1, "cached_input": 0.275, "output": 4.4, "date": "2026-07-02", "source": "test"}


def tiny_config() -> dict:
    """test_rerun's small demo without a trained row: the traces, the critic and the
    teacher row."""
    config = small_config()
    config["evaluate"]["rows"] = ["majority", "teacher"]
    return config


def snakemake(work: Path, config_file: Path, *targets: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", "2", *targets, "--configfile", str(config_file)]  # fmt: skip (targets before --configfile)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done.stdout


def sent(work: Path) -> Counter:
    """Requests sent per (step, row), from the request logs (each line is one answer)."""
    counts: Counter = Counter()
    for path in (work / "results").glob("**/*.requests.jsonl"):
        rel = path.relative_to(work / "results").parts
        n = len(path.read_text().splitlines())
        if rel[0] == "traces":
            counts[("critic" if ".graded." in path.name else "traces", "")] += n
        elif rel[0] == "predictions":
            counts[("evaluate", rel[2])] += n
    return counts


def planned(plan: pl.DataFrame, column: str) -> Counter:
    return Counter({(r["step"], r["row"]): r[column] for r in plan.iter_rows(named=True)})


@pytest.mark.slow
def test_plan_counts_what_the_demo_then_sends(tmp_path, embedded_model):
    work = tmp_path / "work"
    (work / "resources" / "models").mkdir(parents=True)
    (work / "resources" / "models" / embedded_model.name).symlink_to(embedded_model)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config()))

    printed = snakemake(work, config_file, "results/plan.csv")
    before = pl.read_csv(work / "results" / "plan.csv")
    assert "prompt tokens counted with" in printed and "tokenizer of embedded:smollm2-135m-instruct" in printed
    assert set(before["count"]) == {"exact", "at most (traces not written yet)"}
    assert before.filter(pl.col("step") == "critic")["count"].item().startswith("at most")
    assert (before["answered"] == 0).all() and (before["to_send"] == before["requests"]).all()
    assert before.filter(pl.col("backend") == "local")["gpu_hours"].is_null().all()  # no rate known yet

    traces = [f"results/traces/default/{cell}/0.parquet" for cell in ("k562", "rpe1")]
    snakemake(work, config_file, *traces)
    snakemake(work, config_file, "results/plan.csv")  # new answers in the logs: the plan is redone
    after_traces = pl.read_csv(work / "results" / "plan.csv")
    row = after_traces.filter(pl.col("step") == "traces").row(0, named=True)
    assert row["to_send"] == 0 and row["answered"] == row["requests"]
    assert row["completion_basis"] == f"measured: mean of {row['requests']} answers"
    assert (after_traces["count"] == "exact").all()
    assert after_traces.filter(pl.col("step") == "critic")["to_send"].item() > 0  # some traces have reasoning

    graded = [f"results/traces/default/{cell}/0.graded.parquet" for cell in ("k562", "rpe1")]
    snakemake(work, config_file, "results/table1.csv", *graded)
    counts = sent(work)
    expected = planned(before, "to_send")
    expected[("critic", "")] = planned(after_traces, "to_send")[("critic", "")]  # exact once the traces exist
    assert counts == expected, (counts, expected)
    assert before.filter(pl.col("step") == "critic")["to_send"].item() >= counts[("critic", "")]

    snakemake(work, config_file, "results/plan.csv")
    done = pl.read_csv(work / "results" / "plan.csv")
    assert (done["to_send"] == 0).all() and (done["prompt_tokens"] == 0).all()
    assert planned(done, "answered") == counts
    assert "Nothing to be done" in snakemake(work, config_file, "-n", "results/plan.csv")


# --- an API model, without Snakemake ---------------------------------------------------------


def test_answers_in_the_logs_are_not_counted_and_completions_are_measured(tmp_path):
    teacher = {"backend": "openai", "model": "o4-mini", "price": PRICE, "batch_api": True}
    config = demo_config(**{
        "models.teacher": teacher, "data.cells": ["k562"], "data.holdout": [],
        "evaluate.rows": ["majority", "teacher"], "traces.generation": {"max_new_tokens": 500},
        "evaluate.generation": {"max_new_tokens": 300}, "traces.budget_usd": 12.5,
    })  # fmt: skip
    split = tiny_split()
    results = tmp_path / "results"
    sample = draw_sample(split, Sample(None, 6, 88, False), shards=1)
    (results / "traces" / "default").mkdir(parents=True)
    sample.write_parquet(results / "traces" / "default" / "sample.parquet")
    (results / "eval" / "default").mkdir(parents=True)
    select_questions(split, Sample(None, None, 88, False)).write_parquet(results / "eval" / "default" / "questions.parquet")

    settings = step_settings("traces", config)
    requests = generator_requests(trace_shard(sample, "k562", 0, 1), settings)
    model = api_identity(settings.model)
    with RequestLog(results / "traces" / "default" / "k562" / "0.requests.jsonl") as log:
        for request, completion in zip(requests[:2], (100, 300), strict=True):
            log.append(Response(request.key(model), request.tag, "x", "stop", 50, completion, cached_tokens=10), model)
        log.append(Response(requests[2].key("another-model"), "", "x", "stop", 50, 9999), "another-model")

    plan = build_plan(config, results)
    traces = plan.filter(pl.col("step") == "traces").row(0, named=True)
    assert (traces["requests"], traces["answered"], traces["to_send"]) == (6, 2, 4)
    assert traces["completion_basis"] == "measured: mean of 2 answers" and traces["completion_tokens"] == 4 * 200
    price = Price.of(PRICE)
    assert traces["spent_usd"] == pytest.approx(2 * price.usd(50, 0, 10, batch=True) + price.usd(0, 400, batch=True))
    cached = traces["prompt_tokens"] * 20 / 100  # the logged answers' cached share of their prompts
    assert traces["usd"] == pytest.approx(price.usd(traces["prompt_tokens"], 800, cached, batch=True))
    assert traces["token_counter"].startswith(("tiktoken o200k_base", "estimate"))
    teacher_row = plan.filter(pl.col("row") == "teacher").row(0, named=True)
    questions = pl.read_parquet(results / "eval" / "default" / "questions.parquet")
    assert teacher_row["requests"] == questions.height + questions.filter(pl.col("label") != 0).height
    assert teacher_row["completion_basis"] == "max_new_tokens (upper bound)"
    assert teacher_row["completion_tokens"] == 300 * teacher_row["to_send"]
    text = summary(plan, config)
    assert "prices as configured (teacher: 2026-07-02, test); Batch API discount applied" in text
    assert "budgets: traces $12.50" in text


def tiny_split() -> pl.DataFrame:
    rows = [
        {"cell": "k562", "pert": f"P{p}", "gene": f"G{g}", "de": int(g % 3 != 0),
         "direction": None if g % 3 == 0 else int(g % 3 == 2), "label": g % 3,
         "split": "test" if p == 0 else "train", "role": "test" if p == 0 else "train"}
        for p in range(4) for g in range(6)
    ]  # fmt: skip
    return pl.DataFrame(rows).with_columns(pl.col("label", "de", "direction").cast(pl.Int8))
