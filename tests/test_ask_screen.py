"""`synthpert ask` and `synthpert screen` with a fine-tuned adapter, offline.

A workspace is built once: the data step on the demo subset, a configuration whose models
are the embedded SmolLM2, and a LoRA adapter trained by `synthpert.steps.train.train` (one step
on two rows: a real trained adapter, at the least cost) laid out where the workflow puts
it (`results/models/default/synthpert/adapter`). Generation budgets are a few tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import change, step_settings

from synthpert import cli
from synthpert.core import prompts
from synthpert.core.config import complete, model_entry
from synthpert.core.labels import CELLS, CLASS_NAMES, NOT_DE, UP, class_probabilities
from synthpert.core.settings import Generation, Model
from synthpert.errors import CommandError
from synthpert.evaluation.answers import answer_records, build_requests, question_request
from synthpert.llm.requests import Response
from synthpert.tools import ask, question, screen

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "perturbqa-demo"
# INTS5 is a K562 perturbation of PerturbQA's test split: never seen in training.
PERT, CELL = "INTS5", "k562"
SCREEN_GENES = ["HSPA1A", "FTL", "AATF", "ALDOA"]  # up, up, not DE; ALDOA: measured in K562, not for INTS5


@dataclass(frozen=True)
class Workspace:
    root: Path
    results: Path
    config: Path
    table: pl.DataFrame

    def args(self, *extra: str) -> list[str]:
        return [*extra, "--config", str(self.config), "--results", str(self.results)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, embedded_model) -> Workspace:
    from synthpert.steps.train import train

    root = tmp_path_factory.mktemp("ask_screen")
    results = root / "results"
    data = results / "data"
    prepared = cli.main([
        "prepare", "--input-dir", str(DEMO), "--cells", *CELLS, "--holdout", "rpe1",
        "--tuples", str(data / "tuples.parquet"), "--splits-dir", str(data / "splits"),
        "--table5", str(results / "table5.csv"),
    ])  # fmt: skip
    assert prepared == 0
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    for spec in config["models"].values():
        spec["model"] = str(embedded_model)
    config["evaluate"]["generation"] = {"max_new_tokens": 6}
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    rows = [("k562", "ADNP2", "AARS2", NOT_DE), ("k562", "NAA15", "ALDH2", UP)]
    conversations = [
        [{"role": r, "content": t} for r, t in prompts.question_messages(c, p, g)]
        + [{"role": "assistant", "content": prompts.assistant_target(f"{p} knockdown leaves {g} alone.", y)}]
        for c, p, g, y in rows
    ]
    sft = root / "sft.parquet"
    pl.DataFrame({"messages": conversations}).write_parquet(sft)
    trained = {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "lora_r": 4,
               "lora_alpha": 8, "max_length": 512, "logging_steps": 1}  # fmt: skip
    changes = {f"train.{key}": value for key, value in trained.items()}
    train(sft, step_settings("train", complete(change(config, **changes))), results / "models" / "default" / "synthpert")
    table = pl.read_parquet(data / "splits" / "default.parquet")
    return Workspace(root, results, config_path, table)


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- ask


def test_ask_prints_answer_probabilities_reasoning_and_caches(ws, capsys):
    argv = ["ask", *ws.args("--model", "synthpert", "--cell", "K562", "--pert", PERT.lower(), "--gene", "hspa1a")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"knockdown of {PERT} in K562 cells; effect on HSPA1A" in out
    assert "adapter" in out and str(ws.results / "models" / "default" / "synthpert" / "adapter") in out
    assert f"note:     {PERT} is never perturbed in the training rows of split 'default'" in out
    assert "measured: upregulated (PerturbQA, a test row of the split)" in out  # the demo's measurement
    assert "\nreasoning:\n" in out

    line = out.split("probabilities: ")[1].splitlines()[0]
    probs = dict(re.findall(r"(not differentially expressed|downregulated|upregulated) ([01]\.\d{3})", line))
    assert set(probs) == set(CLASS_NAMES.values())
    answer = re.search(r"answer:\s+(.+) \(answered\)", out).group(1)
    assert answer == max(probs, key=lambda name: float(probs[name]))

    cache = ws.results / "ask" / "requests.jsonl"
    (record,) = log_lines(cache)
    assert record["tag"] == f"k562:{PERT}:HSPA1A|de3"
    expected = class_probabilities(record["option_logprobs"])  # the model's own scores
    assert {CLASS_NAMES[c]: f"{p:.3f}" for c, p in expected.items()} == probs

    assert cli.main(argv) == 0  # asked again: answered from the cache
    assert capsys.readouterr().out == out
    assert len(log_lines(cache)) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--cell": "K526"}, "unknown cell line 'K526'; known: HepG2, Jurkat, K562, RPE1; closest known: K562"),
        ({"--pert": "INTS55"}, "unknown perturbation(s), not perturbed in PerturbQA:\n  INTS55; closest known: INTS5"),
        ({"--gene": "HSPA1AA"}, "unknown gene(s), not measured in K562:\n  HSPA1AA; closest known: HSPA1A"),
        ({"--model": "synthpret"}, "closest known: synthpert"),
        ({"--split": "rpe1_holdout"}, "split 'rpe1_holdout' has no trained adapter"),
    ],
)
def test_unknown_names_stop_with_the_closest_known(ws, capsys, change, message):
    question = {"--model": "synthpert", "--cell": "K562", "--pert": PERT, "--gene": "FTL"} | change
    assert cli.main(["ask", *ws.args(*(item for pair in question.items() for item in pair))]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_unknown_names_pass_with_allow_unknown(ws, caplog):
    known = question.measured_genes(ws.table, CELL)
    assert question.resolve_names("gene", ["ftl", "NOTAGENE"], known, True, "measured") == ["FTL", "NOTAGENE"]
    assert "NOTAGENE" in caplog.text
    with pytest.raises(CommandError, match="NOTAGENE; no similar name"):
        question.resolve_names("gene", ["NOTAGENE"], known, False, "measured")


def test_unseen_perturbations_and_cell_lines_are_flagged(ws):
    assert question.training_notes(ws.table, CELL, "ADNP2", "default") == []  # a K562 training perturbation
    (note,) = question.training_notes(ws.table, CELL, PERT, "default")
    assert "never perturbed in the training rows" in note
    holdout = pl.read_parquet(ws.results / "data" / "splits" / "rpe1_holdout.parquet")
    assert question.training_notes(holdout, CELL, PERT, "rpe1_holdout") == []  # every K562 row trains there
    notes = question.training_notes(holdout, "rpe1", "HSPA8", "rpe1_holdout")
    assert len(notes) == 2 and "RPE1 has no training rows" in notes[1]


def test_model_resolution(ws, tmp_path):
    settings = question.load_config(ws.config)
    adapter = ws.results / "models" / "default" / "synthpert" / "adapter"

    by_path = question.resolve_model(str(adapter), settings, "default", ws.results)
    assert (by_path.name, by_path.split, by_path.adapter) == ("synthpert", "default", str(adapter))
    assert by_path.model == Model.of(settings["models"]["student"])  # the configured model with the adapter's base

    assert question.resolve_model("teacher", settings, "default", ws.results).adapter is None
    assert question.resolve_model("base", settings, "default", ws.results).model == Model.of(settings["models"]["student"])

    foreign = tmp_path / "my_adapter"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/other-model"}))
    other = question.resolve_model(str(foreign), settings, "default", ws.results)
    assert other.name == "my_adapter" and other.split is None
    assert other.model == Model.of(model_entry({"backend": "local", "model": "org/other-model"}))
    assert other.model.batch_size == 8 and other.model.dtype == "auto"  # the schema's defaults

    with pytest.raises(CommandError, match="is not a PEFT adapter"):
        question.resolve_model(str(tmp_path), settings, "default", ws.results)


def test_load_config_fills_defaults_and_rejects_bad_values(ws, tmp_path):
    config = question.load_config(ws.config)
    assert config["models"]["student"]["max_retries"] == 6  # a schema default, absent from the file
    bad = yaml.safe_load(ws.config.read_text())
    bad["train"]["batch_size"] = "four"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(CommandError, match="'four' is not of type 'integer'"):
        question.load_config(tmp_path / "bad.yaml")
    with pytest.raises(CommandError, match="not found"):
        question.load_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- screen


def test_screen_ranks_writes_and_agrees_with_measurement(ws, tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("# four genes\nhspa1a, FTL\nAATF\nALDOA\n")
    out = ws.root / "screens" / f"{PERT}.csv"
    settings = step_settings("screen", question.load_config(ws.config), model="synthpert")
    argv = ["screen", "--model", "synthpert", "--cell", "k562", "--pert", PERT, "--genes", str(genes),
            "--settings", settings.params_json(), "--run", settings.run_json(),
            "--results", str(ws.results), "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0

    csv = pl.read_csv(out)
    assert csv.columns == screen.CSV_COLUMNS
    assert sorted(csv["gene"]) == sorted(SCREEN_GENES)
    assert csv["rank"].to_list() == [1, 2, 3, 4]
    assert csv["p_change"].to_list() == sorted(csv["p_change"], reverse=True)
    total = csv["p_not_de"] + csv["p_down"] + csv["p_up"]
    assert ((total - 1).abs() < 1e-9).all()
    assert ((csv["p_change"] - (1 - csv["p_not_de"])).abs() < 1e-9).all()
    assert ((csv["direction"] - (csv["p_up"] - csv["p_down"])).abs() < 1e-9).all()

    truth = ws.table.filter((pl.col("cell") == CELL) & (pl.col("pert") == PERT)).select("gene", "label")
    joined = csv.join(truth, on="gene", how="left")
    assert joined.filter(pl.col("gene") == "ALDOA")["measured"].to_list() == [None]
    measured = joined.filter(pl.col("label").is_not_null())
    assert measured.height == 3
    assert measured["measured"].to_list() == [CLASS_NAMES[c] for c in measured["label"]]

    summary = json.loads(out.with_name(f"{PERT}.summary.json").read_text())
    assert summary["genes"] == 4 and summary["measured"] == 3 and summary["pert_seen_in_training"] is False
    correct = (measured["answer"] == measured["measured"]).sum()
    assert summary["accuracy"] == pytest.approx(correct / 3)
    assert summary["majority_accuracy"] == pytest.approx(2 / 3)  # two of the three measured are up
    parquet = pl.read_parquet(out.with_suffix(".parquet"))
    assert parquet["gene"].to_list() == csv["gene"].to_list() and parquet["raw_text"].null_count() == 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    request_log = out.with_name(f"{PERT}.requests.jsonl")
    assert len(log_lines(request_log)) == 4
    assert cli.main(argv) == 0  # a rerun is answered from the request log
    assert len(log_lines(request_log)) == 4
    assert pl.read_csv(out).equals(csv)


def test_screen_with_an_unknown_gene_writes_nothing(ws, tmp_path, capsys):
    genes = tmp_path / "genes.txt"
    genes.write_text("FTL\nFTLL\n")
    out = tmp_path / "s" / "x.csv"
    argv = ["screen", *ws.args("--model", "synthpert", "--cell", "k562", "--pert", PERT, "--genes", str(genes)),
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 1
    assert "FTLL; closest known: FTL" in capsys.readouterr().err
    assert not out.parent.exists()


def test_all_measured_gene_list(ws):
    genes = question.measured_genes(ws.table, CELL)
    k562 = ws.table.filter(pl.col("cell") == CELL)
    assert genes == sorted(set(k562["gene"])) and len(genes) > 500
    rows = question.question_rows(ws.table, CELL, PERT, genes)
    assert rows.height == len(genes) and rows["qid"].n_unique() == len(genes)
    measured = k562.filter(pl.col("pert") == PERT)
    assert rows["label"].is_not_null().sum() == measured.height
    assert set(rows.filter(pl.col("label").is_not_null())["role"]) == {"test"}


def test_gene_files_and_output_names(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("A, B  C\n# comment\nD # trailing\n\n")
    assert screen.read_gene_file(path) == ["A", "B", "C", "D"]
    path.write_text("# nothing\n")
    with pytest.raises(CommandError, match="names no genes"):
        screen.read_gene_file(path)
    with pytest.raises(CommandError, match=r"--out must name the \.csv"):
        screen.output_paths(tmp_path / "x.parquet")


# --------------------------------------------------------------------------- evaluate helpers


def test_evaluate_requests_and_records_shared_with_ask():
    rows = pl.DataFrame({"qid": ["a", "b"], "cell": ["k562"] * 2, "pert": ["P"] * 2, "gene": ["G", "H"],
                         "label": [NOT_DE, UP]})  # fmt: skip
    generation = Generation(max_new_tokens=4, temperature=0.0, top_p=1.0, reasoning_effort=None)
    requests = build_requests(rows, generation, local=True)
    assert [r.tag for r in requests] == ["a|de3", "b|de3", "b|dir"]
    assert requests[2].options == ("downregulated", "upregulated")
    with pytest.raises(ValueError):  # one response per request, in order
        answer_records(rows, requests, [])
    answers = [Response(r.key("m"), r.tag, "", "error", error="http 400: too long") for r in requests]
    records = answer_records(rows, requests, answers)
    assert {r["status"] for r in records} == {"failed"} and {r["pred"] for r in records} == {None}
    assert all(r.get("score_de") is None and r.get("score_up") is None for r in records)  # a failure is never scored


def test_show_prompt_prints_every_message_whole():
    generation = Generation(max_new_tokens=4, temperature=0.0, top_p=1.0, reasoning_effort=None)
    q = {"qid": "k562:P:G", "cell": "k562", "pert": "P", "gene": "G"}
    text = ask.format_prompt(question_request(q, "de3", generation, local=True))
    system, user = prompts.question_messages("k562", "P", "G")
    assert text == f"prompt:\n[system]\n{system[1]}\n[user]\n{user[1]}\n[assistant, prefilled]\n<think>"
    assert "prefilled" not in ask.format_prompt(question_request(q, "de3", generation, local=False))
