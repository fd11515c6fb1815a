"""A failed request is never an answer: an outage in the middle of the evaluation, through
the real Snakemake and the fake OpenAI server (tests/fake_openai.py). With few retries
some requests fail; their job stops, no table is written from them, and a plain re-run
after the outage asks exactly the failed questions again and completes the tables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest
import yaml
from fake_openai import FakeOpenAI
from test_rerun import small_config

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "SYNTHPERT_TEST_OUTAGE_KEY"
TABLES = ("results/table1.csv", "results/table3.csv")


def outage_config(server: FakeOpenAI) -> dict:
    """One cell line, the majority row and the teacher row asked through the API with one retry."""
    config = small_config()
    config["data"].update(cells=["k562"])
    config["data"]["sha256"] = {k: v for k, v in config["data"]["sha256"].items() if k.startswith("k562")}
    config["models"]["teacher"] = {"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                                   "api_key_env": KEY_ENV, "max_retries": 1, "max_concurrency": 2, "timeout_s": 10}  # fmt: skip
    config["evaluate"].update(rows=["majority", "teacher"], sample={"count": 8, "seed": 88})
    return config


def snakemake(work: Path, config: dict) -> subprocess.CompletedProcess:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", "2", *TABLES, "--configfile", str(path)]  # fmt: skip
    env = {**os.environ, KEY_ENV: "sk-outage-test"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def failed_questions(received: list[dict]) -> set[str]:
    """Questions every attempt of which the server answered with an error."""
    outcomes = defaultdict(list)
    for request in received:
        outcomes[request["question"]].append("status" in request["action"])
    return {question for question, errors in outcomes.items() if all(errors)}


@pytest.mark.slow
def test_an_outage_fails_the_evaluation_and_the_rerun_asks_exactly_the_failed_questions(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with FakeOpenAI() as server:
        config = outage_config(server)
        server.outage(start=3, count=8)  # the endpoint answers 503 for a while, mid-evaluation
        first = snakemake(work, config)
        log = first.stdout + first.stderr
        assert first.returncode != 0, log[-3000:]
        failed = failed_questions(server.received)
        assert failed, "the outage made no request fail"
        # no table was written from the failures, nor any predictions file of the teacher row
        assert not any((work / t).exists() for t in TABLES)
        assert not list((work / "results" / "predictions").glob("*/teacher/**/*.parquet"))
        job_log = next((work / "logs" / "predict").glob("*/teacher/k562/0.log")).read_text()
        assert "requests failed after their retries" in job_log and "Rerun the same target" in job_log

        sent = len(server.received)
        second = snakemake(work, config)  # the endpoint is back
        assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
        again = [r["question"] for r in server.received[sent:]]
    assert sorted(again) == sorted(failed)  # exactly the failed questions, each once
    predictions = pl.read_parquet(next((work / "results" / "predictions").glob("*/teacher/k562/0.parquet")))
    assert "failed" not in predictions["status"].to_list()
    table1 = pl.read_csv(work / TABLES[0]).filter(pl.col("row") == "teacher").row(0, named=True)
    table3 = pl.read_csv(work / TABLES[1]).filter((pl.col("row") == "teacher") & (pl.col("cell") == "k562"))
    de3 = predictions.filter(pl.col("task") == "de3").height
    assert table1["K562_n"] == de3 and table1["K562_n_failed"] == 0
    assert table3["n"][0] == de3 and table3["n_failed"][0] == 0
