"""The results layout has one owner (`core/paths.py`): the rules declare the same paths
literally, as Snakemake rules do, and this checks that the two agree, so a path changed in
one place and not the other fails here rather than as a missing input in a long run."""

from __future__ import annotations

import re

import pytest
from helpers import REPO, demo_config, load_rules

from synthpert.core import paths, rows

# rule -> a path function of core/paths.py, called with the rule's wildcards
DECLARED = {
    "trace_sample": paths.trace_sample("{split}"),
    "traces": paths.trace_shard("{split}", "{cell}", "{shard}"),
    "critic_grade": paths.graded_shard("{split}", "{cell}", "{shard}"),
    "questions": paths.questions("{split}"),
    "predict": paths.predictions("{split}", "{row}", "{cell}", "{shard}"),
    "predict_evidence": paths.predictions("{split}", "{row}", "{cell}", "{shard}"),
    "evidence_table": paths.evidence_table("{split}"),
    "evidence_traces": paths.trace_evidence_table("{split}"),
    "traces_evidence": paths.trace_shard("{split}", "{cell}", "{shard}", evidence=True),
    "critic_grade_evidence": paths.graded_shard("{split}", "{cell}", "{shard}", evidence=True),
    "baseline": paths.predictions("{split}", "{row}", "{cell}"),
    "train": paths.adapter_dir("{split}", "{variant}"),
    "grpo": paths.adapter_dir("{split}", "{rl_row}"),
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    return load_rules(REPO / "config" / "demo.yaml", tmp_path_factory.mktemp("wf"))


def without_constraints(pattern: str) -> str:
    """`{row,majority|knn}` -> `{row}`: a rule's wildcard constraints are not the path."""
    return re.sub(r"\{(\w+),[^{}]*\}", r"{\1}", pattern)


@pytest.mark.parametrize("rule", sorted(DECLARED))
def test_each_rule_declares_the_path_core_paths_computes(rules, rule):
    declared = [without_constraints(o) for o in rules[rule]["output"]]
    assert str(DECLARED[rule]) in declared, (rule, declared)


def test_prepare_declares_every_split_table(rules):
    splits = ["default", "rpe1_holdout"]
    assert {str(paths.split_table(s)) for s in splits} <= set(rules["prepare"]["output"])


def test_request_logs_are_the_logs_of_the_configured_jobs():
    config = demo_config()
    logs = {str(p) for p in paths.request_logs(config)}
    assert "results/traces/default/k562/0.requests.jsonl" in logs
    assert "results/traces/default/k562/0.graded.requests.jsonl" in logs
    assert "results/predictions/default/base/k562/0.requests.jsonl" in logs
    assert not any("/majority/" in log for log in logs)  # a baseline asks no model
    model_rows = [r for r in config["evaluate"]["rows"] if r in rows.LLM_ROWS]
    assert model_rows and all(any(f"/{row}/" in log for log in logs) for row in model_rows)
    assert not any("/evidence/" in log for log in logs)
    trained = {str(p) for p in paths.request_logs(demo_config(**{"train.variants": ["synthpert", "sft_data", "synthpert_evidence"]}))}
    assert trained - logs == {
        f"results/traces/{split}/evidence/{cell}/0.{kind}requests.jsonl"
        for split, cells in (("default", ["k562", "rpe1", "hepg2", "jurkat"]), ("rpe1_holdout", ["k562", "hepg2", "jurkat"]))
        for cell in cells
        for kind in ("", "graded.")
    }
    untrained = [r for r in config["evaluate"]["rows"] if r not in rows.ADAPTER_ROWS]
    alone = {str(p) for p in paths.request_logs(demo_config(**{"train.variants": ["synthpert_evidence"], "evaluate.rows": untrained}))}
    assert {log for log in alone if log.startswith("results/traces/")} == trained - logs  # no plain traces
