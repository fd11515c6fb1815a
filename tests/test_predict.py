"""`synthpert predict`: one row per job, or several rows of one model in one job (the
student's base and adapters through one engine), with the same answers either way."""

from __future__ import annotations

import polars as pl
import pytest
from helpers import demo_config, random_adapter, step_settings

from synthpert import cli
from synthpert.core.paths import adapter_dir
from synthpert.core.rows import engine_rows
from synthpert.errors import CommandError
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


def predict(tmp_path, config, rows, adapters, outs):
    settings = step_settings("predict", config, row=rows[0])
    argv = ["predict", "--questions", str(tmp_path / "questions.parquet"), "--row", *rows, "--split", "default",
            "--cell", "k562", "--shard", "0", "--settings", settings.params_json(), "--run", settings.run_json(),
            "--out", *map(str, outs)]  # fmt: skip
    if adapters:
        argv += ["--adapter", *map(str, adapters)]
    assert cli.main(argv) in (0, None)


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
