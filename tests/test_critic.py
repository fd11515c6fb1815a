"""Step 3: critic grades and the selection of the SFT sets (a fake backend; one real local run)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from helpers import demo_config, step_settings
from test_traces import FakeBackend

from synthpert.cli import main as cli_main
from synthpert.core.labels import CLASS_NAMES, UP
from synthpert.core.prompts import GRADES, SYSTEM_PROMPT, question_messages
from synthpert.core.settings import CriticGrade, CriticSelect
from synthpert.errors import CommandError
from synthpert.core.paths import request_log_path
from synthpert.steps.critic import balanced_kept, grade_traces, kept_expr, select
from synthpert.steps.traces import TRACE_SCHEMA


def traces_table(n: int = 9, cell: str = "k562") -> pl.DataFrame:
    """Answered, correct traces whose reasoning never names a label."""
    rows = []
    for i in range(n):
        label = i % 3
        rows.append(
            {
                "tid": f"{cell}:P{i}:G{i}",
                "cell": cell,
                "pert": f"P{i}",
                "gene": f"G{i}",
                "label": label,
                "reasoning": f"P{i} binds the promoter of G{i} (reasoning {i}).",
                "answer": label,
                "status": "answered",
                "finish_reason": "stop",
                "prompt_tokens": 100,
                "completion_tokens": 50,
                "correct": True,
                "prob_not_de": None,
                "prob_down": None,
                "prob_up": None,
                "raw_text": "",
            }
        )
    return pl.DataFrame(rows, schema=TRACE_SCHEMA)


def config(backend="openai", structured=True, keep=("excellent",), model="fake", balanced=False) -> dict:
    variants = ["synthpert", "sft_data"] + (["synthpert_balanced"] if balanced else [])
    return demo_config(**{
        "critic.keep_grades": list(keep),
        "critic.generation": {"max_new_tokens": 256},
        "models.critic": {"backend": backend, "model": model, "structured_outputs": structured},
        "train.variants": variants,
    })  # fmt: skip


def settings(backend="openai", structured=True, model="fake") -> CriticGrade:
    return step_settings("critic_grade", config(backend, structured, model=model))


def selection(keep=("excellent",), balanced=False) -> CriticSelect:
    return step_settings("critic_select", config(keep=keep, balanced=balanced))


def cli_settings(settings) -> list[str]:
    return ["--settings", settings.params_json(), "--run", settings.run_json()]


def grade_of(request) -> str:
    """A deterministic grade from the reasoning's number."""
    user = request.messages[1][1]
    number = int(user.split("(reasoning ")[1].split(")")[0])
    return GRADES[number % len(GRADES)]


def json_critic(request):
    return json.dumps({"reasoning": "ok", "grade": grade_of(request)})


def tag_critic(request):
    return f"<reasoning>ok</reasoning><evaluation>{grade_of(request)}</evaluation>"


# --- grade ---------------------------------------------------------------------------


def test_grade_with_structured_outputs(tmp_path):
    traces = traces_table().with_columns(
        pl.when(pl.col("tid") == "k562:P4:G4").then(None).otherwise(pl.col("reasoning")).alias("reasoning")
    )
    backend = FakeBackend(json_critic)
    out = tmp_path / "graded.parquet"
    graded = grade_traces(traces, settings(), out, backend)
    assert pl.read_parquet(out).equals(graded)
    assert graded.columns[: len(traces.columns)] == traces.columns
    assert graded["tid"].to_list() == traces["tid"].to_list()
    assert len(backend.sent) == traces.height - 1  # no reasoning, no request
    assert all(json.loads(r.response_format)["json_schema"]["strict"] for r in backend.sent)
    grades = dict(zip(graded["tid"], graded["grade"], strict=True))
    assert grades["k562:P4:G4"] is None
    assert grades["k562:P1:G1"] == "good" and grades["k562:P5:G5"] == "excellent"
    assert graded["grade_logprobs"].is_null().all()
    assert request_log_path(out).exists()


def test_critic_never_sees_the_label_or_the_answer(tmp_path):
    backend = FakeBackend(json_critic)
    grade_traces(traces_table(), settings(), tmp_path / "g.parquet", backend)
    for request in backend.sent:
        text = "\n".join(content for _, content in request.messages)
        for name in CLASS_NAMES.values():
            assert name not in text
        assert SYSTEM_PROMPT not in text


def test_rejected_schema_falls_back_to_evaluation_tags(tmp_path):
    def critic(request):
        if request.response_format is not None:
            return "ERROR http 400: response_format json_schema is not supported by this model"
        return tag_critic(request)

    backend = FakeBackend(critic)
    graded = grade_traces(traces_table(), settings(), tmp_path / "g.parquet", backend)
    assert len(backend.sent) == 2 * 9
    assert "<evaluation>" in backend.sent[-1].messages[0][1]
    assert graded["grade"].to_list() == [GRADES[i % 5] for i in range(9)]


def test_tags_without_structured_outputs_and_unparseable_grades(tmp_path):
    backend = FakeBackend(lambda r: "the reasoning is fine" if "(reasoning 0)" in r.messages[1][1] else tag_critic(r))
    graded = grade_traces(traces_table(), settings(structured=False), tmp_path / "g.parquet", backend)
    assert all(r.response_format is None for r in backend.sent)
    assert graded["grade"][0] is None and graded["grade"][1] == "good"


def test_local_critic_scores_the_grades(tmp_path):
    def scores(request):
        return {g: -float(i) if g == "average" else -10.0 - i for i, g in enumerate(GRADES)}

    backend = FakeBackend(lambda r: "", scores)
    graded = grade_traces(traces_table(3), settings("local"), tmp_path / "g.parquet", backend)
    request = backend.sent[0]
    assert request.max_new_tokens == 0 and request.option_tag == "evaluation" and request.options == GRADES
    assert (graded["grade"] == "average").all()
    assert set(json.loads(graded["grade_logprobs"][0])) == set(GRADES)


def test_nothing_to_grade_needs_no_model(tmp_path):
    traces = traces_table(3).with_columns(pl.lit(None, pl.String).alias("reasoning"))
    graded = grade_traces(traces, settings(), tmp_path / "g.parquet", backend=None)
    assert graded.height == 3 and graded["grade"].is_null().all()
    assert not request_log_path(tmp_path / "g.parquet").exists()


def test_grading_resumes_from_the_log(tmp_path):
    out = tmp_path / "g.parquet"
    grade_traces(traces_table(), settings(), out, FakeBackend(json_critic))
    again = FakeBackend(json_critic)
    grade_traces(traces_table(), settings(), out, again)
    assert again.sent == []


# --- select --------------------------------------------------------------------------


def graded_table() -> pl.DataFrame:
    """Traces of two cell lines with grades, some wrong, unknown or cut off."""
    graded = []
    for cell in ["k562", "rpe1"]:
        df = traces_table(12, cell).with_columns(
            pl.Series("grade", ["excellent", "excellent", "excellent", "good"] * 3),
            pl.lit(None, pl.String).alias("grade_logprobs"),
            pl.lit("stop").alias("critic_finish_reason"),
            pl.lit(300, pl.Int64).alias("critic_prompt_tokens"),
            pl.lit(10, pl.Int64).alias("critic_completion_tokens"),
        )
        graded.append(df)
    df = pl.concat(graded)
    return df.with_columns(
        # wrong answer, "I do not know", cut off: never kept, whatever the grade
        pl.when(pl.col("tid") == "k562:P0:G0").then(pl.lit(UP, pl.Int8)).otherwise("answer").alias("answer"),
        pl.when(pl.col("tid") == "k562:P1:G1")
        .then(pl.lit("unknown"))
        .when(pl.col("tid") == "k562:P2:G2")
        .then(pl.lit("truncated"))
        .otherwise("status")
        .alias("status"),
    ).with_columns(pl.when(pl.col("status") == "unknown").then(None).otherwise("answer").alias("answer"))


def test_kept_rule():
    df = graded_table()
    kept = df.filter(kept_expr(["excellent"]))
    assert not set(kept["tid"]) & {"k562:P0:G0", "k562:P1:G1", "k562:P2:G2"}
    assert (kept["grade"] == "excellent").all()
    assert (kept["answer"] == kept["label"]).all()
    assert kept.height == 2 * 9 - 3
    with_good = df.filter(kept_expr(["excellent", "good"]))
    assert with_good.height == 2 * 12 - 3


def write_shards(tmp_path) -> list:
    df = graded_table()
    paths = []
    for cell in ["k562", "rpe1"]:
        path = tmp_path / f"{cell}.parquet"
        df.filter(pl.col("cell") == cell).write_parquet(path)
        paths.append(path)
    return paths


def test_select_writes_the_sft_sets_and_statistics(tmp_path):
    out = tmp_path / "sft"
    argv = ["critic", "select", "--grades", *map(str, write_shards(tmp_path)), "--split", "default"]
    argv += [*cli_settings(selection(balanced=True)), "--out-dir", str(out)]
    assert cli_main(argv) == 0
    synth = pl.read_parquet(out / "synthpert.parquet")
    sft = pl.read_parquet(out / "sft_data.parquet")
    assert synth.height == 15
    assert synth["tid"].to_list() == sft["tid"].to_list()  # the same training tuples
    row = synth.filter(pl.col("tid") == "rpe1:P4:G4").row(0, named=True)
    expected = [{"role": r, "content": c} for r, c in question_messages("rpe1", "P4", "G4")]
    assert row["messages"][:2] == expected
    assert row["messages"][2] == {
        "role": "assistant",
        "content": "<think>P4 binds the promoter of G4 (reasoning 4).</think><answer>downregulated</answer>",
    }
    assert sft.filter(pl.col("tid") == "rpe1:P4:G4")["messages"][0][2]["content"] == "<answer>downregulated</answer>"
    bal = pl.read_parquet(out / "synthpert_balanced.parquet")
    counts = bal.group_by("label").len()["len"].to_list()
    assert len(counts) == 3 and len(set(counts)) == 1
    assert set(bal["tid"]) <= set(synth["tid"])
    stats = pl.read_csv(out / "critic_stats.csv")
    assert stats.columns == ["dimension", "value", "n", "kept", "kept_fraction"]
    total = stats.filter(pl.col("dimension") == "all").row(0, named=True)
    assert (total["n"], total["kept"]) == (24, 15)
    grade_rows = dict(zip(*stats.filter(pl.col("dimension") == "grade").select("value", "n"), strict=True))
    assert grade_rows == {"excellent": 18, "good": 6}
    status_rows = stats.filter(pl.col("dimension") == "status")
    assert dict(zip(status_rows["value"], status_rows["kept"], strict=True)) == {
        "answered": 15,
        "truncated": 0,
        "unknown": 0,
    }
    tokens = stats.filter((pl.col("dimension") == "tokens") & (pl.col("value") == "critic_prompt")).row(0, named=True)
    assert (tokens["n"], tokens["kept"]) == (24 * 300, 15 * 300)
    grades = pl.read_csv(out / "grades.csv")
    assert grades.height == 2 * len(GRADES)
    assert grades.filter((pl.col("cell") == "k562") & (pl.col("grade") == "good"))["n"].item() == 3
    assert grades.filter(pl.col("grade") == "terrible")["n"].sum() == 0


def test_select_without_balanced_skips_it(tmp_path):
    select(
        pl.concat([pl.read_parquet(p) for p in write_shards(tmp_path)]), "default", selection(), tmp_path / "o"
    )
    assert not (tmp_path / "o" / "synthpert_balanced.parquet").exists()
    assert (tmp_path / "o" / "synthpert.parquet").exists()


def test_balanced_is_seeded_and_refuses_a_missing_class():
    kept = graded_table().filter(kept_expr(["excellent", "good"]))
    kept = kept.filter(~pl.col("tid").is_in(["rpe1:P0:G0", "rpe1:P3:G3"]))  # 5 / 7 / 7 per class
    assert balanced_kept(kept, 88).height == 15
    assert balanced_kept(kept, 88).equals(balanced_kept(kept, 88))
    assert not balanced_kept(kept, 88).equals(balanced_kept(kept, 1))
    with pytest.raises(CommandError, match=r"none are kept for \['upregulated'\]"):
        balanced_kept(kept.filter(pl.col("label") != UP), 88)


def test_nothing_kept_names_the_split_and_shows_counts(tmp_path):
    df = graded_table().with_columns(pl.lit("bad").alias("grade"))
    with pytest.raises(CommandError, match=r"split 'rpe1_holdout': no trace is kept(.|\n)*bad"):
        select(df, "rpe1_holdout", selection(), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_select_refuses_duplicate_shards(tmp_path, capsys):
    path = write_shards(tmp_path)[0]
    argv = ["critic", "select", "--grades", str(path), str(path), "--split", "default"]
    argv += [*cli_settings(selection()), "--out-dir", str(tmp_path / "o")]
    assert cli_main(argv) == 1
    assert "12 traces appear in several --grades files" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_grade_with_the_embedded_model(tmp_path, embedded_model):
    traces_file = tmp_path / "traces.parquet"
    traces_table(2).write_parquet(traces_file)
    out = tmp_path / "graded.parquet"
    argv = ["critic", "grade", "--traces", str(traces_file), *cli_settings(settings("local", model=str(embedded_model)))]
    argv += ["--out", str(out)]
    assert cli_main(argv) == 0
    graded = pl.read_parquet(out)
    assert graded["grade"].is_in(list(GRADES)).all()  # scored, so never unparseable
    for text, grade in zip(graded["grade_logprobs"], graded["grade"], strict=True):
        logprobs = json.loads(text)
        assert set(logprobs) == set(GRADES) and all(v < 0 for v in logprobs.values())
        assert max(logprobs, key=logprobs.get) == grade
    assert graded["critic_completion_tokens"].to_list() == [0, 0]
