"""The workflow re-runs exactly what changed, checked with the real Snakemake on a small
finished run: settings that only change how steps run plan nothing, a new row plans only
its own jobs, and retrained weights answer afresh under new request keys.

The finished run is written by an earlier version of the workflow (`PREVIOUS`, taken from
this repository's history), so every test here also checks that a results folder survives
an upgrade: this version re-runs none of its jobs and pays for none of its answers again."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import change

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "perturbqa-demo"
# The last version before the model settings got one owner (llm/model.py, core/paths.py):
# its rules, settings and request keys must still be this version's.
PREVIOUS = "e90fe5d77c1b4cdf93104f79dbb6b416da7343d3"
EXPENSIVE = {"fetch", "prepare", "trace_sample", "traces", "critic_grade", "critic_select", "train", "questions", "predict"}


def small_config() -> dict:
    """config/demo.yaml cut to two cell lines (PerturbQA's split), one trained variant
    and short generations: every kind of job, in a few minutes on 2 cores."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cells = ["k562", "rpe1"]
    config["data"].update(source=str(DEMO_DATA), cells=cells, holdout=[])
    config["data"]["sha256"] = {k: v for k, v in config["data"]["sha256"].items() if k.split("-")[0] in cells}
    config["traces"].update(sample={"count": 12, "seed": 88, "balanced": True}, generation={"max_new_tokens": 96})
    config["critic"]["keep_grades"] = ["excellent", "good", "average", "bad", "terrible"]
    config["train"].update(variants=["synthpert"], max_steps=2, save_steps=1)
    config["evaluate"].update(
        rows=["majority", "gene_prior", "base", "synthpert"], sample={"count": 2, "seed": 88},
        generation={"max_new_tokens": 8}, bootstrap=20,
    )  # fmt: skip
    return config


def snakemake(work: Path, config: dict, *args: str, timeout: int = 1500, repo: Path = REPO) -> str:
    path = work / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"), "--directory", str(work)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(  # the Snakefile imports the package of its own checkout, as its jobs do
        [*cmd, "--cores", "2", *args, "--configfile", str(path)], capture_output=True, text=True, timeout=timeout, env=env
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return log


def planned(log: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a dry run plans."""
    jobs = []
    for rule, body in re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", log, re.MULTILINE | re.DOTALL):
        found = re.search(r"^\s+wildcards: (.*)$", body, re.MULTILINE)
        wildcards = dict(item.split("=", 1) for item in found.group(1).split(", ")) if found else {}
        jobs.append((rule, wildcards))
    return jobs


def previous_version(folder: Path) -> Path:
    """The workflow as it was at `PREVIOUS` (its rules run its own src/)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True)
    assert archive.returncode == 0, f"git archive {PREVIOUS}: {archive.stderr.decode()[-500:]} (a clone with history is needed)"
    folder.mkdir()
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def request_logs(work: Path) -> dict[str, str]:
    return {str(p.relative_to(work)): p.read_text() for p in sorted(work.glob("results/**/*.requests.jsonl"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, embedded_model) -> tuple[Path, dict]:
    """A finished run of the small configuration, written by the previous version; this
    version finds nothing to do in it."""
    work = tmp_path_factory.mktemp("rerun")
    (work / "resources" / "models").mkdir(parents=True)
    (work / "resources" / "models" / embedded_model.name).symlink_to(embedded_model)
    config = small_config()
    snakemake(work, config, repo=previous_version(tmp_path_factory.mktemp("previous") / "workflow"))
    assert "Nothing to be done" in snakemake(work, config, "-n")
    return work, config


@pytest.mark.slow
def test_this_version_pays_for_no_answer_the_previous_one_logged(finished):
    """Every request of the run is answered under this version's keys: the plan sends
    nothing, and predict jobs forced to run again add no line to any request log."""
    work, config = finished
    before = request_logs(work)
    assert any("/predictions/" in name for name in before) and any("/traces/" in name for name in before)
    snakemake(work, config, "results/plan.csv")
    plan = pl.read_csv(work / "results" / "plan.csv")
    assert plan.height and plan["to_send"].sum() == 0, plan.select("step", "row", "requests", "to_send")
    snakemake(work, config, "--forcerun", "predict", "results/table3.csv")
    assert request_logs(work) == before
    predict_log = (work / "logs" / "predict" / "default" / "synthpert" / "k562" / "0.log").read_text()
    assert "already answered" in predict_log, predict_log[-2000:]


# Files a step keeps beside its outputs on purpose: what was paid for, and where a killed
# training resumes (Snakemake deletes a failed job's outputs; these must survive it).
UNDECLARED_ON_PURPOSE = (".requests.jsonl", "/checkpoints/")


@pytest.mark.slow
def test_every_file_a_step_writes_is_a_declared_output(finished):
    work, config = finished
    summary = snakemake(work, config, "--summary", "all", "results/plan.csv")  # plan.csv: an earlier test's
    declared = {line.split("\t")[0] for line in summary.splitlines() if line.startswith("results/")}
    written = {str(p.relative_to(work)) for p in (work / "results").rglob("*") if p.is_file()}
    hidden = {
        f for f in written
        if not any(f == d or f.startswith(d + "/") for d in declared) and not any(k in f for k in UNDECLARED_ON_PURPOSE)
    }  # fmt: skip
    assert declared and not hidden, sorted(hidden)


@pytest.mark.slow
def test_result_neutral_changes_plan_no_expensive_job(finished, tmp_path):
    work, config = finished
    mirror = tmp_path / "mirror"
    shutil.copytree(DEMO_DATA, mirror)  # the same checksummed bytes elsewhere
    neutral = change(
        config,
        **{
            "data.source": str(mirror),
            "models.teacher.max_concurrency": 3,
            "models.teacher.batch_size": 2,
            "models.critic.max_retries": 1,
            "models.critic.timeout_s": 5,
            "models.student.batch_size": 3,
            "models.student.engine.max_num_seqs": 8,
            "traces.max_requests": 1000,
            "traces.max_tokens": 10**7,
            "train.logging_steps": 5,
            "train.save_steps": 7,
            "evaluate.bootstrap": 30,
        },
    )
    jobs = planned(snakemake(work, neutral, "-n"))
    assert not [job for job in jobs if job[0] in EXPENSIVE], jobs
    assert {rule for rule, _ in jobs} <= {"class_table", "plot_views", "all"}  # new bootstrap intervals only


@pytest.mark.slow
def test_a_new_row_plans_only_its_own_jobs(finished):
    work, config = finished
    wider = change(config, **{"evaluate.rows": [*config["evaluate"]["rows"], "knn", "teacher"]})
    jobs = planned(snakemake(work, wider, "-n"))
    rules = {rule for rule, _ in jobs}
    assert {"baseline", "predict"} <= rules
    assert rules <= {"baseline", "predict", "auroc_table", "class_table", "plot_roc", "plot_confusion", "plot_views", "all"}
    assert {w["row"] for rule, w in jobs if rule in ("baseline", "predict")} == {"knn", "teacher"}


@pytest.mark.slow
def test_retraining_answers_afresh_under_new_keys(finished):
    work, config = finished
    answers = work / "results" / "predictions" / "default"
    trained_log = answers / "synthpert" / "k562" / "0.requests.jsonl"
    base_log = answers / "base" / "k562" / "0.requests.jsonl"
    before, base_before = trained_log.read_text(), base_log.read_text()
    adapter = work / "results" / "models" / "default" / "synthpert" / "adapter" / "adapter_model.safetensors"
    weights_before = adapter.read_bytes()

    retrained = change(config, **{"train.learning_rate": config["train"]["learning_rate"] / 10})
    jobs = planned(snakemake(work, retrained, "-n", "results/table3.csv"))
    assert sorted(w.get("variant", w.get("row")) for rule, w in jobs if rule in ("train", "predict")) == [
        "synthpert", "synthpert", "synthpert"  # one adapter, its two cell lines
    ]  # fmt: skip
    snakemake(work, retrained, "results/table3.csv")

    assert adapter.read_bytes() != weights_before
    after = trained_log.read_text()
    assert after.startswith(before)  # the old adapter's answers are untouched
    old = {json.loads(line)["key"] for line in before.splitlines()}
    new = [json.loads(line) for line in after[len(before) :].splitlines()]
    assert new and not old & {record["key"] for record in new}  # new weights, new keys: all asked again
    assert len({record["model"] for record in new}) == 1 and new[0]["model"] not in before
    predict_log = (work / "logs" / "predict" / "default" / "synthpert" / "k562" / "0.log").read_text()
    assert "already answered" not in predict_log
    assert base_log.read_text() == base_before  # the base model did not change: not asked again
