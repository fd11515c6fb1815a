"""Step 2: the trace sample and the teacher runs (a fake backend; one real local run)."""

from __future__ import annotations

import json
from collections.abc import Callable

import polars as pl
import pytest
from helpers import demo_config, step_settings

from synthpert.cli import main as cli_main
from synthpert.core.labels import CLASS_NAMES, DOWN, NOT_DE, UP
from synthpert.core.settings import Sample, Traces
from synthpert.errors import CommandError, ConfigError
from synthpert.core.paths import request_log_path
from synthpert.llm.requests import Request, RequestLog, Response, SpendingGuard, plan
from synthpert.steps.traces import draw_sample, run_shard, usage_path

LABEL_OF_SYSTEM = {f"is given to you {name}.": cls for cls, name in CLASS_NAMES.items()}


def explained_label(request: Request) -> int:
    """The label an `explain` generator prompt states."""
    return next(cls for text, cls in LABEL_OF_SYSTEM.items() if text in request.messages[0][1])


class FakeBackend:
    """Deterministic canned answers; counts what it sends. `answer(request)` returns
    (text, finish_reason) or a Response-like dict; `scores(request)` option log-probs."""

    def __init__(self, answer: Callable[[Request], str], scores: Callable[[Request], dict] | None = None):
        self.model = "fake-model"
        self.answer = answer
        self.scores = scores
        self.sent: list[Request] = []

    def run(self, requests, log: RequestLog, guard: SpendingGuard | None = None, desc: str = "") -> dict:
        done, pending = plan(requests, self.model, log)
        for key, request in pending.items():
            if guard is not None and not guard.allow():
                break
            self.sent.append(request)
            reply = self.answer(request)
            text, finish = reply if isinstance(reply, tuple) else (reply, "stop")
            error = text.removeprefix("ERROR ") if text.startswith("ERROR ") else None
            response = Response(
                key,
                request.tag,
                "" if error else text,
                "error" if error else finish,
                prompt_tokens=100,
                completion_tokens=0 if error else 20,
                option_logprobs=self.scores(request) if self.scores else None,
                error=error,
            )
            log.append(response, self.model)
            if guard is not None:
                guard.charge(response)
            done[key] = response
        return done


def explaining_teacher(request: Request) -> str:
    label = explained_label(request)
    return f"<think>Because {request.tag} is {CLASS_NAMES[label]}.</think><answer>{CLASS_NAMES[label]}</answer>"


def split_table() -> pl.DataFrame:
    rows = []
    for cell in ["k562", "rpe1", "hepg2"]:
        for p in range(4):
            for g in range(5):
                label = (p + g) % 3
                rows.append(
                    {
                        "cell": cell,
                        "pert": f"P{p}",
                        "gene": f"G{g}",
                        "de": int(label != NOT_DE),
                        "direction": None if label == NOT_DE else int(label == UP),
                        "label": label,
                        "split": "test" if g == 4 else "train",
                        "role": "test" if g == 4 else "train",
                    }
                )
    return pl.DataFrame(rows).with_columns(pl.col("label", "de").cast(pl.Int8), pl.col("direction").cast(pl.Int8))


def settings(backend="openai", shards=1, model="fake", **traces) -> Traces:
    changes = {
        "traces.shards": shards,
        "traces.generation": {"max_new_tokens": 64},
        "models.teacher": {"backend": backend, "model": model},
        **{f"traces.{key}": value for key, value in traces.items()},
    }
    return step_settings("traces", demo_config(**changes))


def sample_of(**values) -> Sample:
    return Sample(**{"fraction": None, "count": None, "seed": 88, "balanced": False, **values})


# --- sample --------------------------------------------------------------------------


def test_sample_takes_training_rows_only_and_all_when_unset():
    df = draw_sample(split_table(), sample_of(seed=88), shards=1)
    assert df.height == 3 * 4 * 4  # gene G4 is the test set
    assert "role" not in df.columns
    assert df["tid"].is_unique().all()
    assert df.filter(pl.col("tid") == "k562:P1:G2").height == 1
    assert set(df["shard"]) == {0}


def test_sample_is_the_same_whatever_the_shards():
    split = split_table()
    one = draw_sample(split, sample_of(fraction=0.5, seed=88), shards=1)
    three = draw_sample(split, sample_of(fraction=0.5, seed=88), shards=3)
    assert sorted(one["tid"]) == sorted(three["tid"])
    # rows shuffled in the input: same draw
    shuffled = draw_sample(split.sample(fraction=1.0, shuffle=True, seed=1), sample_of(fraction=0.5, seed=88), shards=3)
    assert shuffled.equals(three)
    # shards are balanced within each cell line
    sizes = three.group_by("cell", "shard").len()
    for cell in ["k562", "rpe1", "hepg2"]:
        per_shard = sizes.filter(pl.col("cell") == cell)["len"].to_list()
        assert max(per_shard) - min(per_shard) <= 1 and len(per_shard) == 3


def test_sample_seed_count_and_fraction():
    split = split_table()
    a = draw_sample(split, sample_of(fraction=0.25, seed=88), 1)
    b = draw_sample(split, sample_of(fraction=0.25, seed=7), 1)
    assert a.height == b.height == 12
    assert set(a["tid"]) != set(b["tid"])
    assert draw_sample(split, sample_of(fraction=0.25, seed=88), 1).equals(a)
    counted = draw_sample(split, sample_of(fraction=0.25, count=5, seed=88), 1)
    assert counted.height == 5  # count wins over fraction


def test_sample_refuses_a_split_without_training_rows_and_an_empty_sample():
    with pytest.raises(CommandError, match="no training rows"):
        draw_sample(split_table().with_columns(pl.lit("test").alias("role")), sample_of(seed=88), 1)
    with pytest.raises(CommandError, match="selects no tuple out of 48"):
        draw_sample(split_table(), sample_of(fraction=0.001, seed=88), 1)


def test_sample_cli_writes_the_file(tmp_path):
    split_file = tmp_path / "default.parquet"
    split_table().write_parquet(split_file)
    out = tmp_path / "traces" / "sample.parquet"
    argv = ["traces", "sample", "--split-file", str(split_file), "--out", str(out)]
    sampled = step_settings("trace_sample", demo_config(**{"traces.shards": 2}))
    rc = cli_main([*argv, "--settings", sampled.params_json(), "--run", sampled.run_json()])
    assert rc == 0
    assert set(pl.read_parquet(out)["shard"]) == {0, 1}


# --- run -----------------------------------------------------------------------------


@pytest.fixture
def sample() -> pl.DataFrame:
    return draw_sample(split_table(), sample_of(seed=88), shards=2)


def test_run_writes_traces_usage_and_log(tmp_path, sample):
    backend = FakeBackend(explaining_teacher)
    out = tmp_path / "k562" / "0.parquet"
    df = run_shard(sample, "k562", 0, settings(shards=2), out, backend)
    expected = sample.filter((pl.col("cell") == "k562") & (pl.col("shard") == 0))
    assert pl.read_parquet(out).equals(df)
    assert df["tid"].to_list() == expected["tid"].to_list()
    assert df["status"].unique().to_list() == ["answered"]
    assert df["correct"].all()
    assert df["answer"].to_list() == df["label"].to_list()
    assert df["reasoning"][0] == f"Because {df['tid'][0]} is {CLASS_NAMES[df['label'][0]]}."
    usage = json.loads(usage_path(out).read_text())
    assert usage["requests"] == df.height == len(backend.sent)
    assert usage["prompt_tokens"] == 100 * df.height
    assert request_log_path(out).name == "0.requests.jsonl" and request_log_path(out).exists()
    # the teacher was told the truth (explain), prompts carry the cell line's display name
    assert all("K562" in r.messages[1][1] for r in backend.sent)


def test_run_records_wrong_unknown_unparsed_and_failed_answers(tmp_path, sample):
    rows = sample.filter((pl.col("cell") == "rpe1") & (pl.col("shard") == 1))
    tids = rows["tid"].to_list()
    canned = {
        tids[0]: "<think>r</think><answer>I do not know</answer>",
        tids[1]: "<think>r</think><answer>upregulated</answer><answer>downregulated</answer>",
        tids[2]: ("<think>r", "length"),
        tids[3]: "ERROR http 400: bad request",
    }
    wrong = {NOT_DE: DOWN, DOWN: UP, UP: NOT_DE}

    def teacher(request):
        if request.tag in canned:
            return canned[request.tag]
        return f"<think>r</think><answer>{CLASS_NAMES[wrong[explained_label(request)]]}</answer>"

    df = run_shard(sample, "rpe1", 1, settings(shards=2), tmp_path / "x.parquet", FakeBackend(teacher))
    by_tid = {row["tid"]: row for row in df.iter_rows(named=True)}
    assert by_tid[tids[0]]["status"] == "unknown" and by_tid[tids[0]]["answer"] is None
    assert by_tid[tids[1]]["status"] == "ambiguous"
    assert by_tid[tids[2]]["status"] == "truncated" and by_tid[tids[2]]["reasoning"] is None
    assert by_tid[tids[3]]["status"] == "error" and by_tid[tids[3]]["finish_reason"] == "error"
    rest = df.filter(~pl.col("tid").is_in(tids[:4]))
    assert rest.height > 0 and (rest["status"] == "answered").all()
    assert not df["correct"].any()


def test_predict_approach_does_not_tell_the_teacher(tmp_path, sample):
    backend = FakeBackend(lambda r: "<think>r</think><answer>upregulated</answer>")
    df = run_shard(sample, "k562", 1, settings(shards=2, approach="predict"), tmp_path / "x.parquet", backend)
    assert not any("is given to you" in r.messages[0][1] for r in backend.sent)
    assert df["correct"].to_list() == (df["label"] == UP).to_list()


def test_local_teacher_answers_by_option_likelihood(tmp_path, sample):
    def scores(request):
        return {"not differentially expressed": -3.0, "downregulated": -1.0, "upregulated": -2.0}

    backend = FakeBackend(lambda r: "<think>\nreasoning left open", scores)
    df = run_shard(sample, "hepg2", 0, settings("local", shards=2), tmp_path / "x.parquet", backend)
    request = backend.sent[0]
    assert request.prefill == "<think>\n" and request.option_tag == "answer"
    assert set(request.options) == set(CLASS_NAMES.values())
    assert (df["answer"] == DOWN).all() and (df["status"] == "answered").all()
    assert df["reasoning"][0] == "reasoning left open"  # the model ended its turn: reasoning is done
    total = df["prob_not_de"] + df["prob_down"] + df["prob_up"]
    assert ((total - 1).abs() < 1e-9).all()
    assert df["prob_down"][0] == pytest.approx(1 / (1 + 2.718281828459045**-1 + 2.718281828459045**-2))


def test_rerun_sends_nothing_twice(tmp_path, sample):
    out = tmp_path / "x.parquet"
    first = FakeBackend(explaining_teacher)
    df = run_shard(sample, "k562", 0, settings(shards=2), out, first)
    second = FakeBackend(explaining_teacher)
    again = run_shard(sample, "k562", 0, settings(shards=2), out, second)
    assert len(first.sent) == df.height and second.sent == []
    assert again.equals(df)


def test_guard_stop_raises_leaves_no_output_and_resumes(tmp_path, sample):
    out = tmp_path / "x.parquet"
    n = sample.filter((pl.col("cell") == "k562") & (pl.col("shard") == 0)).height
    first = FakeBackend(explaining_teacher)
    with pytest.raises(CommandError, match=rf"2 of {n} requests answered, {n - 2} missing.*rerunning"):
        run_shard(sample, "k562", 0, settings(shards=2, max_requests=2), out, first)
    assert not out.exists() and not usage_path(out).exists()
    assert len(first.sent) == 2
    second = FakeBackend(explaining_teacher)
    df = run_shard(sample, "k562", 0, settings(shards=2), out, second)
    assert len(second.sent) == n - 2 and df.height == n
    assert {r.tag for r in first.sent}.isdisjoint({r.tag for r in second.sent})


def test_token_guard_stops_too(tmp_path, sample):
    with pytest.raises(CommandError, match="spending guard"):
        run_shard(
            sample,
            "k562",
            0,
            settings(shards=2, max_tokens=150),
            tmp_path / "x.parquet",
            FakeBackend(explaining_teacher),
        )


def test_unknown_cell_and_bad_shard_are_refused(tmp_path, sample):
    with pytest.raises(CommandError, match=r"cell line id\(s\) \['K526'\]"):
        run_shard(sample, "K526", 0, settings(shards=2), tmp_path / "x.parquet", FakeBackend(explaining_teacher))
    with pytest.raises(CommandError, match="shard 2 is outside"):
        run_shard(sample, "k562", 2, settings(shards=2), tmp_path / "x.parquet", FakeBackend(explaining_teacher))
    with pytest.raises(CommandError, match="more shards"):
        run_shard(sample, "k562", 0, settings(shards=1), tmp_path / "x.parquet", FakeBackend(explaining_teacher))
    with pytest.raises(ConfigError, match="traces.model: 'nobody' is not a model"):
        demo_config(**{"traces.model": "nobody"})
    assert not list(tmp_path.iterdir())


def test_a_cell_line_missing_from_the_sample_gets_empty_outputs(tmp_path, sample):
    out = tmp_path / "jurkat" / "0.parquet"
    df = run_shard(sample, "jurkat", 0, settings(shards=2), out, backend=None)  # no model needed
    assert df.height == 0 and pl.read_parquet(out).schema == df.schema
    assert json.loads(usage_path(out).read_text())["requests"] == 0


@pytest.mark.slow
def test_run_with_the_embedded_model(tmp_path, embedded_model):
    sample_file = tmp_path / "sample.parquet"
    cell = "hepg2"
    draw_sample(split_table().filter(pl.col("cell") == cell), sample_of(count=2, seed=88), 1).write_parquet(sample_file)
    config = settings("local", model=str(embedded_model), generation={"max_new_tokens": 16})
    out = tmp_path / cell / "0.parquet"
    argv = ["traces", "run", "--cell", cell, "--shard", "0", "--sample", str(sample_file)]
    argv += ["--settings", config.params_json(), "--run", config.run_json(), "--out", str(out)]
    assert cli_main(argv) == 0
    df = pl.read_parquet(out)
    assert df.height == 2
    assert df["answer"].is_in([0, 1, 2]).all()  # the likeliest label, always
    assert df["status"].is_in(["answered", "truncated"]).all()
    assert ((df["prob_not_de"] + df["prob_down"] + df["prob_up"] - 1).abs() < 1e-6).all()
    assert df["raw_text"].str.starts_with("<think>\n").all()
    assert json.loads(usage_path(out).read_text())["requests"] == df.height
    # a second run answers from the log, so the output is identical
    out.unlink()
    assert cli_main(argv) == 0
    assert pl.read_parquet(out).equals(df)
