"""The evidence rows through the real Snakemake: off unless listed in evaluate.rows (the
paper's DAG is unchanged), and when listed, the evidence table is built and read by their
predict jobs only, and the rows land in the tables beside the others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import demo_config

from synthpert.core import paths, rows
from synthpert.errors import ConfigError
from synthpert.llm.requests import log_records
from synthpert.steps.plan import evaluate_jobs

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def run(workdir: Path, config: dict, *args: str, timeout: int = 600) -> str:
    path = workdir / "config.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def test_an_evidence_row_asks_the_model_of_its_plain_row():
    config = {"traces": {"model": "teacher"}, "train": {"model": "student"}, "models": {}}
    assert rows.row_model_name("base_evidence", config) == rows.row_model_name("base", config) == "student"
    assert rows.row_model_name("teacher_evidence", config) == rows.row_model_name("teacher", config) == "teacher"
    assert rows.uses_evidence("base_evidence") and not rows.uses_evidence("base")
    assert set(rows.EVIDENCE_ROWS) <= set(rows.LLM_ROWS)
    assert {"base_evidence", "teacher_evidence"}.isdisjoint(rows.ADAPTER_ROWS)  # untrained: no adapter
    with pytest.raises(ConfigError, match="such as 'teacher'"):  # ask and screen show no evidence
        rows.model_of("teacher_evidence", config)


@pytest.mark.parametrize("listed", [False, True])
def test_evidence_rows_are_off_unless_listed(tmp_path, listed):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if listed:
        config["evaluate"]["rows"] = config["evaluate"]["rows"] + ["base_evidence", "teacher_evidence"]
    log = run(tmp_path, config, "-n", "--quiet", "rules")
    assert ("predict_evidence" in log) == listed and ("evidence_table" in log) == listed, log[-3000:]


def test_evidence_rows_end_to_end(tmp_path, embedded_model):
    """Two cell lines, two questions each, four tokens: the evidence table, the base model
    asked with it, table 3 with the row beside a lookup; a second run plans nothing. (What
    the prompts hold is tests/test_predict.py's; that `base` asks as before, test_rerun's.)"""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cells = ["k562", "rpe1"]
    config["data"].update(source=str(REPO / "data" / "perturbqa-demo"), cells=cells, holdout=[])
    config["data"]["sha256"] = {k: v for k, v in config["data"]["sha256"].items() if k.split("-")[0] in cells}
    config["models"]["student"]["model"] = str(embedded_model)  # no conversion in this folder
    config["evaluate"].update(rows=["gene_prior", "base_evidence"], sample={"count": 2, "seed": 88},
                              generation={"max_new_tokens": 4}, bootstrap=10)  # fmt: skip
    log = run(tmp_path, config, "--cores", "2", "-p", "results/table3.csv", timeout=900)
    assert "--evidence results/evidence/default.parquet" in log
    table = pl.read_csv(tmp_path / "results" / "table3.csv")
    assert {"gene_prior", "base_evidence"} <= set(table["row"])
    evidence = pl.read_parquet(tmp_path / paths.evidence_table("default"))
    questions = pl.read_parquet(tmp_path / paths.questions("default"))
    key = ["cell", "pert", "gene"]
    assert evidence.select(key).sort(key).equals(questions.select(key).sort(key))
    for cell in cells:
        answers = pl.read_parquet(tmp_path / paths.predictions("default", "base_evidence", cell, 0))
        logged = log_records(tmp_path / paths.request_log_path(paths.predictions("default", "base_evidence", cell, 0)))
        assert answers.height == len(logged) > 0
    # A second run re-runs nothing: the evidence rows' jobs are as stable as the others.
    again = run(tmp_path, config, "--cores", "2", "-n", "results/table3.csv")
    assert "Nothing to be done" in again, again[-2000:]


def test_the_plan_counts_the_evidence_rows_longer_prompts(tmp_path):
    config = demo_config(**{"data.cells": ["k562", "rpe1"], "data.holdout": [], "evaluate.rows": ["base", "base_evidence"]})
    questions = pl.DataFrame({"qid": ["k562:A:G", "rpe1:A:G"], "cell": ["k562", "rpe1"], "pert": ["A", "A"],
                              "gene": ["G", "G"], "label": [0, 0]}, schema_overrides={"label": pl.Int8})  # fmt: skip
    for path, frame in (
        (paths.questions("default", tmp_path), questions),
        (paths.evidence_table("default", tmp_path), questions.select("cell", "pert", "gene", text=pl.lit("BLOCK"))),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    jobs = {(job.row, job.log.parent.name): job for job in evaluate_jobs(config, tmp_path)}
    assert len(jobs) == 4
    for cell in ("k562", "rpe1"):
        plain, shown = jobs["base", cell].requests, jobs["base_evidence", cell].requests
        assert [r.messages[1][1] + "\n\nBLOCK" for r in plain] == [r.messages[1][1] for r in shown]
