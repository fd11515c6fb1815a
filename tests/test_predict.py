"""`synthpert predict`: one row per job, or several rows of one model in one job (the
student's base and adapters through one engine), with the same answers either way."""

from __future__ import annotations

import polars as pl
import pytest
from helpers import demo_config, random_adapter, step_settings

from synthpert import cli
from synthpert.core.paths import adapter_dir
from synthpert.core.prompts import question_messages
from synthpert.core.rows import engine_rows
from synthpert.llm.requests import log_records
from synthpert.errors import CommandError
from synthpert.evaluation.answers import build_requests, with_evidence
from synthpert.steps.predict import row_adapters

QUESTIONS = pl.DataFrame(
    {
        "qid": ["k562:ADNP2:AARS2", "k562:POLR2B:MYC"],
        "cell": ["k562", "k562"],
        "pert": ["ADNP2", "POLR2B"],
        "gene": ["AARS2", "MYC"],
        "label": [1, 0],  # a differentially expressed pair is asked the direction question too
    },
    schema_overrides={"label": pl.Int8},
)


def predict(tmp_path, config, rows, adapters, outs, evidence=None, rc=(0, None)):
    settings = step_settings("predict", config, row=rows[0])
    argv = ["predict", "--questions", str(tmp_path / "questions.parquet"), "--row", *rows, "--split", "default",
            "--cell", "k562", "--shard", "0", "--settings", settings.params_json(), "--run", settings.run_json(),
            "--out", *map(str, outs)]  # fmt: skip
    if adapters:
        argv += ["--adapter", *map(str, adapters)]
    if evidence:
        argv += ["--evidence", str(evidence)]
    assert cli.main(argv) in rc


def test_several_rows_in_one_job_answer_as_one_row_per_job(embedded_model, tmp_path):
    QUESTIONS.write_parquet(tmp_path / "questions.parquet")
    config = demo_config(**{"models.student.model": str(embedded_model), "evaluate.generation.max_new_tokens": 8})
    adapter = random_adapter(embedded_model, adapter_dir("default", "synthpert", tmp_path / "results"))
    together = [tmp_path / "together" / f"{row}.parquet" for row in ("base", "synthpert")]
    predict(tmp_path, config, ["base", "synthpert"], [adapter], together)
    alone_base, alone_tuned = tmp_path / "alone" / "base.parquet", tmp_path / "alone" / "synthpert.parquet"
    predict(tmp_path, config, ["base"], [], [alone_base])
    predict(tmp_path, config, ["synthpert"], [adapter], [alone_tuned])
    base, tuned = pl.read_parquet(together[0]), pl.read_parquet(together[1])
    assert base.height == tuned.height == 3  # de3 twice, dir once
    assert base.equals(pl.read_parquet(alone_base)) and tuned.equals(pl.read_parquet(alone_tuned))
    assert not base.select("p_up", "p_down").equals(tuned.select("p_up", "p_down"))  # the adapter answered
    # Each row keeps its own request log beside its output.
    assert all(path.with_suffix(".requests.jsonl").is_file() for path in together)


def test_adapters_are_matched_to_their_rows(tmp_path):
    sft = adapter_dir("default", "sft_data", tmp_path)
    tuned = adapter_dir("default", "synthpert", tmp_path)
    assert row_adapters(["base", "sft_data", "synthpert"], [sft, tuned]) == [None, sft, tuned]
    with pytest.raises(CommandError, match="need 2 adapter"):
        row_adapters(["base", "sft_data", "synthpert"], [sft])
    with pytest.raises(CommandError, match="adapter of row 'synthpert', not of 'sft_data'"):
        row_adapters(["sft_data", "synthpert"], [tuned, sft])


def test_one_engine_per_shard_only_for_a_vllm_student():
    assert engine_rows(demo_config()) == []  # backend local: one job per row
    config = demo_config(**{"models.student.backend": "vllm"})
    assert engine_rows(config) == ["base", "sft_data", "synthpert", "synthpert_grpo"]  # the teacher row asks the teacher
    assert engine_rows(demo_config(**{"models.student.backend": "vllm", "evaluate.rows": ["majority", "synthpert"]})) == []


def evidence_table(path):
    blocks = {"ADNP2": "Evidence from the training data:\n- AARS2 in K562: DE after 1 of 4 knockdowns (25.0%); 0 up, 1 down.",
              "POLR2B": "Evidence from the training data:\n- MYC in K562: no training knockdown measured it."}  # fmt: skip
    table = QUESTIONS.select("cell", "pert", "gene").with_columns(text=pl.col("pert").replace_strict(blocks))
    table.write_parquet(path)
    return blocks


def test_an_evidence_row_asks_each_question_with_its_block(embedded_model, tmp_path):
    QUESTIONS.write_parquet(tmp_path / "questions.parquet")
    blocks = evidence_table(tmp_path / "evidence.parquet")
    config = demo_config(**{"models.student.model": str(embedded_model), "evaluate.generation.max_new_tokens": 4,
                            "evaluate.rows": ["base", "base_evidence"]})  # fmt: skip
    shown = tmp_path / "base_evidence.parquet"
    predict(tmp_path, config, ["base_evidence"], [], [shown], evidence=tmp_path / "evidence.parquet")
    answers = pl.read_parquet(shown)
    assert answers.select("qid", "task").rows() == [(q, t) for q in QUESTIONS["qid"] for t in ("de3", "dir")][:3]
    records = log_records(shown.with_suffix(".requests.jsonl"))
    model = records[0]["model"]
    settings = step_settings("predict", config, row="base_evidence")
    rows = with_evidence(QUESTIONS, pl.read_parquet(tmp_path / "evidence.parquet"), "test")
    requests = build_requests(rows, settings.generation, settings.model.local)
    assert {r.messages[1][1] for r in requests} == {
        question_messages("k562", pert, gene, task, blocks[pert])[1][1]
        for pert, gene, tasks in (("ADNP2", "AARS2", ("de3", "dir")), ("POLR2B", "MYC", ("de3",)))
        for task in tasks
    }
    assert {r["key"] for r in records} == {r.key(model) for r in requests}  # asked with the blocks
    plain = build_requests(QUESTIONS, settings.generation, settings.model.local)  # what `base` asks
    assert not {r["key"] for r in records} & {r.key(model) for r in plain}


def test_evidence_is_given_exactly_to_the_evidence_rows(tmp_path, capsys):
    QUESTIONS.write_parquet(tmp_path / "questions.parquet")
    evidence_table(tmp_path / "evidence.parquet")
    QUESTIONS.head(1).select("cell", "pert", "gene").with_columns(text=pl.lit("x")).write_parquet(tmp_path / "short.parquet")
    config = demo_config(**{"evaluate.rows": ["base", "base_evidence"]})
    out = [tmp_path / "out.parquet"]
    for rows, evidence, error in (
        (["base_evidence"], None, "pass --evidence"),
        (["base"], tmp_path / "evidence.parquet", "for evidence rows only"),
        (["base", "base_evidence"], tmp_path / "evidence.parquet", "mix evidence rows and plain rows"),
        (["base_evidence"], tmp_path / "short.parquet", "1 of 2 questions have no block"),
    ):
        predict(tmp_path, config, rows, [], out * len(rows), evidence=evidence, rc=(1,))
        assert error in capsys.readouterr().err
    assert not out[0].exists()  # stopped before loading a model


def test_evidence_rows_are_answered_one_job_each():
    config = demo_config(**{"models.student.backend": "vllm", "evaluate.rows": ["base", "synthpert", "base_evidence"]})
    assert engine_rows(config) == ["base", "synthpert"]
