"""The trained evidence rows (docs/evidence.md): `synthpert_evidence` learns from traces the
teacher wrote shown each tuple's evidence block, graded by a critic shown the same block,
and is asked with the block; `synthpert_grpo_evidence` continues it by GRPO on evidence
prompts. The paper's traces, critic, SFT sets and GRPO settings are unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import demo_config, step_settings
from test_critic import cli_settings, graded_table, selection
from test_traces import FakeBackend, explaining_teacher, sample_of, settings, split_table

from synthpert.cli import main as cli_main
from synthpert.core import paths, rows
from synthpert.core.prompts import critic_messages, generator_messages, question_messages, user_query
from synthpert.core.settings import Grpo, GrpoEvidence
from synthpert.errors import CommandError
from synthpert.llm.step_requests import critic_requests, generator_requests
from synthpert.steps.critic import select
from synthpert.steps.plan import EVIDENCE_TRACES, build_plan, critic_jobs, trace_jobs
from synthpert.steps.traces import draw_sample, run_shard

REPO = Path(__file__).resolve().parents[1]


def blocks(tuples: pl.DataFrame) -> pl.DataFrame:
    """An evidence table: a block naming its tuple, for every tuple."""
    return tuples.select("cell", "pert", "gene", text=pl.format("BLOCK {}:{}:{}", "cell", "pert", "gene"))


def test_the_rows_and_variants():
    assert {"synthpert_evidence", "synthpert_grpo_evidence"} <= set(rows.EVIDENCE_ROWS) & set(rows.ADAPTER_ROWS)
    assert rows.RL_ROWS["synthpert_grpo_evidence"] == "synthpert_evidence"
    plain = demo_config()
    both = demo_config(**{"train.variants": ["synthpert", "sft_data", "synthpert_evidence"]})
    only = demo_config(**{"train.variants": ["synthpert_evidence"], "evaluate.rows": ["knn", "synthpert_evidence"]})
    assert rows.sft_variants(both) == rows.sft_variants(plain) == ["synthpert", "sft_data"]
    assert [rows.plain_traces(c) for c in (plain, both, only)] == [True, True, False]
    assert [rows.evidence_traces(c) for c in (plain, both, only)] == [False, True, True]
    assert [rows.trace_kinds(c) for c in (plain, both, only)] == [[False], [False, True], [True]]
    assert rows.row_model_name("synthpert_evidence", plain) == plain["train"]["model"]


def test_the_teacher_and_critic_prompts_hold_the_block_after_the_query():
    query = user_query("k562", "P", "G")
    for label_given in (generator_messages("k562", "P", "G", 1), critic_messages("k562", "P", "G", "why")):
        assert query in label_given[1][1] and "BLOCK" not in label_given[1][1]
    teacher = generator_messages("k562", "P", "G", 1, evidence="BLOCK")
    assert teacher[0] == generator_messages("k562", "P", "G", 1)[0]  # the paper's system prompt
    assert teacher[1][1] == f"{query}\n\nBLOCK"
    critic = critic_messages("k562", "P", "G", "why", evidence="BLOCK")
    assert f"Original User Query:\n{query}\n\nBLOCK\n\nAI's Reasoning" in critic[1][1]


def test_evidence_traces_carry_the_block_the_teacher_saw(tmp_path):
    sample = draw_sample(split_table(), sample_of(seed=88), shards=1)
    backend = FakeBackend(explaining_teacher)
    table = blocks(sample)
    df = run_shard(sample, "k562", 0, settings(), tmp_path / "k562" / "0.parquet", backend, table)
    assert df.height == len(backend.sent) > 0
    for request, trace in zip(backend.sent, df.iter_rows(named=True), strict=True):
        block = f"BLOCK k562:{trace['pert']}:{trace['gene']}"
        assert trace["evidence"] == block
        assert request.messages[1][1] == f"{user_query('k562', trace['pert'], trace['gene'])}\n\n{block}"
    # the critic is shown the block kept with the trace
    for request in critic_requests(df, step_settings("critic_grade"), "tags"):
        assert request.messages[1][1].count("BLOCK k562:") == 1
    # the plain traces keep the paper's prompt, with an empty evidence column
    plain = run_shard(sample, "k562", 0, settings(), tmp_path / "plain" / "0.parquet", FakeBackend(explaining_teacher))
    assert plain["evidence"].is_null().all()


def test_a_tuple_without_a_block_stops_before_the_teacher(tmp_path):
    sample = draw_sample(split_table(), sample_of(seed=88), shards=1)
    out = tmp_path / "k562" / "0.parquet"
    split_file, sample_file, table_file = tmp_path / "split.parquet", tmp_path / "sample.parquet", tmp_path / "ev.parquet"
    split_table().write_parquet(split_file)
    sample.write_parquet(sample_file)
    missing = sample.filter(pl.col("cell") == "k562")["tid"][0]
    partial = blocks(sample.filter(pl.col("tid") != missing))
    partial.write_parquet(table_file)
    traces = settings(model="fake-no-key")
    argv = ["traces", "run", "--sample", str(sample_file), "--evidence", str(table_file), "--cell", "k562",
            "--shard", "0", *cli_settings(traces), "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 1  # no API key is needed to be told: it stops before the backend
    assert not out.exists()
    with pytest.raises(CommandError, match="have no block in the evidence table"):
        run_shard(sample, "k562", 0, traces, out, FakeBackend(explaining_teacher), partial)


def test_select_evidence_writes_the_evidence_set_with_its_blocks(tmp_path):
    graded = graded_table().with_columns(evidence=pl.format("BLOCK {}", "tid"))
    kept = select(graded, "default", selection(), tmp_path, evidence=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "critic_stats_evidence.csv", "grades_evidence.csv", "synthpert_evidence.parquet",
    ]  # fmt: skip
    sft = pl.read_parquet(tmp_path / "synthpert_evidence.parquet")
    assert sft["tid"].to_list() == sorted(kept["tid"])
    row = sft.row(0, named=True)
    question = question_messages(row["cell"], row["pert"], row["gene"], evidence=f"BLOCK {row['tid']}")
    assert row["messages"][:2] == [{"role": r, "content": c} for r, c in question]
    assert row["messages"][2]["content"].startswith("<think>")
    # the paper's selection refuses evidence traces, and --evidence refuses the paper's traces
    with pytest.raises(CommandError, match="select them with --evidence"):
        select(graded, "default", selection(), tmp_path / "plain")
    with pytest.raises(CommandError, match="written without an evidence block"):
        select(graded_table(), "default", selection(), tmp_path / "ev", evidence=True)
    assert not (tmp_path / "plain").exists() and not (tmp_path / "ev").exists()


def test_the_evidence_selection_has_no_balanced_variant():
    config = demo_config(**{"train.variants": ["synthpert", "sft_data", "synthpert_balanced", "synthpert_evidence"]})
    assert step_settings("critic_select", config).balanced
    assert not step_settings("critic_select", config, evidence=True).balanced


def test_grpo_of_the_evidence_row_adds_the_evidence_settings_only_to_it():
    config = demo_config(**{"train.variants": ["synthpert", "sft_data", "synthpert_evidence"], "evidence.max_listed": 3})
    plain = step_settings("grpo", config, rl_row="synthpert_grpo")
    shown = step_settings("grpo", config, rl_row="synthpert_grpo_evidence")
    assert type(plain) is Grpo and "evidence" not in plain.params()  # the paper's row: its jobs unchanged
    assert isinstance(shown, GrpoEvidence) and shown.params()["evidence"]["max_listed"] == 3
    assert {k: v for k, v in shown.params().items() if k != "evidence"} == plain.params()
    for settings_ in (plain, shown):
        again = Grpo.from_cli(json.loads(settings_.params_json()), json.loads(settings_.run_json()))
        assert again == settings_


def test_the_plan_counts_the_evidence_traces_prompts(tmp_path):
    config = demo_config(**{"data.cells": ["k562", "rpe1"], "data.holdout": [], "traces.shards": 1,
                            "train.variants": ["synthpert", "sft_data", "synthpert_evidence"]})  # fmt: skip
    sample = draw_sample(split_table().filter(pl.col("cell") != "hepg2"), sample_of(count=6, seed=88), shards=1)
    for path, frame in ((paths.trace_sample("default", tmp_path), sample),
                        (paths.trace_evidence_table("default", tmp_path), blocks(sample))):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    plain, shown = trace_jobs(config, tmp_path, False), trace_jobs(config, tmp_path, True)
    assert [j.row for j in shown] == [EVIDENCE_TRACES] * 2 and [j.row for j in plain] == ["", ""]
    for a, b in zip(plain, shown, strict=True):
        assert b.log == tmp_path / "traces" / "default" / "evidence" / a.log.relative_to(tmp_path / "traces" / "default")
        assert [r.messages[1][1].split("\n\n")[0] for r in b.requests] == [r.messages[1][1] for r in a.requests]
        assert all("\n\nBLOCK " in r.messages[1][1] for r in b.requests)
    placeholders = critic_jobs(config, tmp_path, 10, True)
    assert all(not j.exact and all("\n\nBLOCK " in r.messages[1][1] for r in j.requests) for j in placeholders)
    assert generator_requests(sample.head(0), step_settings("traces", config)) == []


def test_the_plan_of_the_evidence_variant_alone_counts_no_plain_trace(tmp_path):
    """Trained alone, `synthpert_evidence` has no plain trace job (the DAG asks for none), so
    the plan prices only the evidence traces and their critic."""
    api = {"backend": "openai", "model": "o4-mini", "price": {"input": 1.1, "output": 4.4, "date": "2026-07-02", "source": "test"}}
    config = demo_config(**{"models.teacher": api, "models.critic": api, "data.cells": ["k562", "rpe1"], "data.holdout": [],
                            "traces.shards": 1, "train.variants": ["synthpert_evidence"], "evaluate.rows": ["majority"]})  # fmt: skip
    split = split_table().filter(pl.col("cell") != "hepg2")
    sample = draw_sample(split, sample_of(count=6, seed=88), shards=1)
    for path, frame in ((paths.trace_sample("default", tmp_path), sample),
                        (paths.trace_evidence_table("default", tmp_path), blocks(sample)),
                        (paths.questions("default", tmp_path), split.filter(pl.col("split") == "test"))):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    plan = build_plan(config, tmp_path)
    assert plan.select("step", "row").rows() == [("traces", EVIDENCE_TRACES), ("critic", EVIDENCE_TRACES)]
    assert plan.filter(pl.col("step") == "traces")["requests"].item() == 6
    both = {**config, "train": {**config["train"], "variants": ["synthpert", "synthpert_evidence"]}}
    assert build_plan(both, tmp_path).select("step", "row").rows() == [
        ("traces", ""), ("critic", ""), ("traces", EVIDENCE_TRACES), ("critic", EVIDENCE_TRACES)
    ]


def test_synthpert_evidence_end_to_end(tmp_path, embedded_model):
    """Two cell lines: the trace sample's blocks, traces shown them, the critic, SFT on
    evidence prompts, the adapter asked with the questions' blocks into table 3; a second
    run does nothing. The DAG holds no plain traces (no plain variant is trained)."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cells = ["k562", "rpe1"]
    config["data"].update(source=str(REPO / "data" / "perturbqa-demo"), cells=cells, holdout=[])
    config["data"]["sha256"] = {k: v for k, v in config["data"]["sha256"].items() if k.split("-")[0] in cells}
    for name in ("teacher", "critic", "student"):
        config["models"][name]["model"] = str(embedded_model)  # no conversion in this folder
    config["traces"].update(sample={"count": 12, "seed": 88, "balanced": True}, generation={"max_new_tokens": 96})
    config["critic"]["keep_grades"] = ["excellent", "good", "average", "bad", "terrible"]
    # The gene lines only: the 135M teacher shown the whole block never closes its reasoning
    # (config/demo_evidence.yaml), and a cut-off trace is never kept.
    config["evidence"] = {"pair": False, "neighbours": False}
    config["train"].update(variants=["synthpert_evidence"], max_steps=1, batch_size=2, save_steps=1)
    config["evaluate"].update(rows=["knn", "synthpert_evidence"], sample={"count": 2, "seed": 88},
                              generation={"max_new_tokens": 4}, bootstrap=10)  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"]  # fmt: skip
    done = subprocess.run([*command, "-p", "results/table3.csv"], capture_output=True, text=True, timeout=1500)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "rule traces:" not in log and "rule traces_evidence:" in log  # no plain traces
    traces = pl.concat(
        [pl.read_parquet(tmp_path / paths.trace_shard("default", c, 0, evidence=True)) for c in cells]
    )
    table = pl.read_parquet(tmp_path / paths.trace_evidence_table("default"))
    shown = traces.join(table.select("cell", "pert", "gene", "text"), on=["cell", "pert", "gene"], how="left")
    assert shown.height == 12 and shown["evidence"].to_list() == shown["text"].to_list()
    sft = pl.read_parquet(tmp_path / "results" / "sft" / "default" / "synthpert_evidence.parquet")
    assert sft.height > 0
    for row in sft.join(table, on=["cell", "pert", "gene"]).iter_rows(named=True):
        assert row["messages"][1]["content"] == f"{user_query(row['cell'], row['pert'], row['gene'])}\n\n{row['text']}"
    assert "--adapter results/models/default/synthpert_evidence/adapter" in log
    assert "--evidence results/evidence/default.parquet" in log
    assert "synthpert_evidence" in set(pl.read_csv(tmp_path / "results" / "table3.csv")["row"])
    again = subprocess.run([*command, "-n", "results/table3.csv"], capture_output=True, text=True, timeout=600)
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-2000:]
