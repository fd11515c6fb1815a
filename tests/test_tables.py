"""Tables 1-4 (and the report plots) on a tiny hand-made evaluation.

Questions (label 0 not DE, 1 down, 2 up):

    q0 k562 T1 gA 0 | q1 k562 T2 gA 2 | q2 k562 T1 gB 1 | q3 k562 T2 gB 0
    q4 rpe1 U1 gA 2 | q5 rpe1 U2 gA 0

Row `good` answers everything right except q5 (unparsed); row `bad` says "not DE"
to everything with constant scores. Training rows exist for T1 and U1 only, so the
unseen-perturbation tables keep q1, q3 (k562) and q5 (rpe1).
"""

from __future__ import annotations

import csv

import polars as pl
import pytest

from synthpert.cli import main as cli_main
from synthpert.evaluation.metrics import METRIC_NAMES
from synthpert.evaluation.predictions import load_predictions
from synthpert.steps.plots import confusion_figure, views_figure
from synthpert.steps.tables import default_reported_path

QUESTIONS = [
    (0, "k562", "T1", "gA", 0),
    (1, "k562", "T2", "gA", 2),
    (2, "k562", "T1", "gB", 1),
    (3, "k562", "T2", "gB", 0),
    (4, "rpe1", "U1", "gA", 2),
    (5, "rpe1", "U2", "gA", 0),
]
# qid -> (de3 pred, score_de); dir rows: qid -> (pred, score_up)
GOOD_DE3 = {0: (0, 0.1), 1: (2, 0.9), 2: (1, 0.8), 3: (0, 0.2), 4: (2, 0.7), 5: (None, 0.5)}
GOOD_DIR = {1: (2, 0.8), 2: (1, 0.3), 4: (2, 0.6)}
BAD_DE3 = {q: (0, 0.0) for q in range(6)}
BAD_DIR = {q: (2, 0.5) for q in (1, 2, 4)}


def questions() -> pl.DataFrame:
    frame = pl.DataFrame(QUESTIONS, schema=["qid", "cell", "pert", "gene", "label"], orient="row")
    return frame.with_columns(
        de=(pl.col("label") != 0).cast(pl.Int64),
        direction=pl.when(pl.col("label") == 0)
        .then(None)
        .otherwise((pl.col("label") == 2).cast(pl.Int64)),
    )


def predictions(de3: dict, direction: dict, source: str) -> pl.DataFrame:
    q = {row[0]: row for row in QUESTIONS}
    records = []
    for task, answers in (("de3", de3), ("dir", direction)):
        for qid, (pred, score) in answers.items():
            _, cell, pert, gene, label = q[qid]
            records.append(
                {
                    "qid": qid,
                    "cell": cell,
                    "pert": pert,
                    "gene": gene,
                    "label": label,
                    "task": task,
                    "raw_text": "",
                    "pred": pred,
                    "status": "answered" if pred is not None else "no_tag",
                    "score_de": score if task == "de3" else None,
                    "score_up": score if task == "dir" else None,
                    "score_source": source,
                }
            )
    return pl.DataFrame(
        records, schema_overrides={"pred": pl.Int64, "score_de": pl.Float64, "score_up": pl.Float64}
    )


@pytest.fixture
def workdir(tmp_path):
    """Questions, splits, predictions of rows good/bad per cell line, a reported CSV."""
    questions().write_parquet(tmp_path / "questions.parquet")
    pl.DataFrame(
        {
            "cell": ["rpe1", "k562"],
            "pert": ["T1", "U1"],
            "gene": ["gZ", "gZ"],
            "de": [0, 0],
            "direction": [None, None],
            "label": [0, 0],
            "split": ["train"] * 2,
            "role": ["train"] * 2,
        },
        schema_overrides={"direction": pl.Int64},
    ).write_parquet(tmp_path / "splits.parquet")
    for row, de3, direction, source in (
        ("good", GOOD_DE3, GOOD_DIR, "label_mapping"),
        ("bad", BAD_DE3, BAD_DIR, "probabilities"),
    ):
        frame = predictions(de3, direction, source)
        for cell in ("k562", "rpe1"):
            # baselines write {row}/{cell}.parquet; LLM rows {row}/{cell}/{shard}.parquet
            if row == "good":
                path = tmp_path / "predictions" / "default" / row / cell / "0.parquet"
            else:
                path = tmp_path / "predictions" / "default" / row / f"{cell}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.filter(pl.col("cell") == cell).write_parquet(path)
    with open(tmp_path / "reported.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "split", "paper", "model", "cell", "metric", "value", "source"])
        w.writerow([1, "default", "P", "SUMMER", "k562", "auroc_per_gene", 0.62, "paper table 1"])
        w.writerow([1, "default", "P", "SUMMER", "rpe1", "auroc_per_gene", 0.59, "paper table 1"])
        # another paper's copy of the same model, printed under a metric of unknown kind
        w.writerow([1, "default", "S", "SUMMER", "k562", "auroc_as_reported", 0.6, "S table 1"])
        w.writerow([3, "default", "P", "X", "all", "accuracy", 0.5, "paper table 3"])
        w.writerow([1, "other_split", "P", "Y", "k562", "auroc_per_gene", 0.7, "elsewhere"])
    return tmp_path


def run_tables(
    workdir,
    table,
    split="default",
    extra=(),
    settings='{"bootstrap": 200, "rows": ["good", "bad"], "seed": 88}',
):
    files = sorted(str(p) for p in (workdir / "predictions" / "default").rglob("*.parquet"))
    out = workdir / "out" / f"table{table}.csv"
    code = cli_main(
        [
            "tables",
            "--table",
            str(table),
            "--split",
            split,
            "--predictions",
            *files,
            "--questions",
            str(workdir / "questions.parquet"),
            "--splits-file",
            str(workdir / "splits.parquet"),
            "--reported",
            str(workdir / "reported.csv"),
            "--settings",
            settings,
            "--out",
            str(out),
            *extra,
        ]
    )
    return code, out


def cell_columns(cell: str) -> list[str]:
    views = (
        *("auroc_per_gene", "n_genes", "auroc_per_pert", "ap_per_pert", "n_perts"),
        *("auroc_pooled", "auroc_paper", "n", "n_failed"),
    )
    subsets = ("auroc_paper_subsets_mean", "auroc_paper_subsets_sd", "n_subset")
    return [f"{cell}_{c}" for c in (*views, *subsets)]


def test_table1_three_auroc_views_with_reported_rows(workdir):
    code, out = run_tables(workdir, 1)
    assert code == 0
    t = pl.read_csv(out)
    assert t.columns == [
        "split",
        "kind",
        "row",
        "score_source",
        *cell_columns("K562"),
        "K562_auroc_as_reported",  # reported-only columns stay with their cell line
        *cell_columns("RPE1"),
        "paper",
        "source",
    ]
    # settings order, reported rows last, one per (paper, model)
    assert t["row"].to_list() == ["good", "bad", "SUMMER", "SUMMER"]
    good = t.row(0, named=True)
    # k562 gA: (0: .1, 2: .9) -> 1; gB: (1: .8, 0: .2) -> 1; pooled over 4 tuples -> 1
    assert good["K562_auroc_per_gene"] == 1.0 and good["K562_n_genes"] == 2
    # per perturbation: T1 (q0 .1 not DE, q2 .8 DE) and T2 (q3 .2, q1 .9) both ranked right;
    # rpe1's U1 and U2 have one tuple each: no perturbation with both classes
    assert good["K562_auroc_per_pert"] == 1.0 and good["K562_ap_per_pert"] == 1.0
    assert good["K562_n_perts"] == 2
    assert good["RPE1_auroc_per_pert"] is None and good["RPE1_n_perts"] == 0
    assert good["K562_auroc_pooled"] == 1.0 and good["K562_n"] == 4
    # rpe1 gA: DE .7 vs unparsed .5 -> 1
    assert good["RPE1_auroc_per_gene"] == 1.0 and good["RPE1_n"] == 2
    assert good["score_source"] == "label_mapping" and good["kind"] == "computed"
    # paper protocol: k562 hard answers all right -> 1; rpe1: q4 (DE) answered "up" -> 1,
    # q5 (not DE) unparsed -> 0.5: the positive outranks the negative -> 1
    assert good["K562_auroc_paper"] == 1.0 and good["RPE1_auroc_paper"] == 1.0
    # 20% of 4 tuples is 1 tuple per draw: one class, no AUROC, but the size is kept
    assert good["K562_auroc_paper_subsets_mean"] is None and good["K562_n_subset"] == 1
    assert good["paper"] is None and good["source"] is None
    bad = t.row(1, named=True)
    assert bad["K562_auroc_per_gene"] == 0.5 and bad["K562_auroc_pooled"] == 0.5
    # constant scores: every pair tied (0.5); one threshold, precision 1/2 at recall 1
    assert bad["K562_auroc_per_pert"] == 0.5 and bad["K562_ap_per_pert"] == 0.5
    assert bad["K562_auroc_paper"] == 0.5  # "not DE" everywhere: every hard score 0
    reported = t.row(2, named=True)
    assert reported["kind"] == "reported" and reported["source"] == "paper table 1"
    assert reported["paper"] == "P"
    assert reported["K562_auroc_per_gene"] == 0.62 and reported["RPE1_auroc_per_gene"] == 0.59
    assert reported["K562_n"] is None and reported["K562_auroc_pooled"] is None
    assert reported["K562_auroc_paper"] is None and reported["K562_auroc_as_reported"] is None
    other = t.row(3, named=True)
    assert other["kind"] == "reported" and other["paper"] == "S"
    assert other["K562_auroc_as_reported"] == 0.6
    assert all(other[f"K562_auroc_{v}"] is None for v in ("per_gene", "pooled", "paper"))
    assert "Y" not in t["row"].to_list()  # reported for another split


def test_table2_direction_auroc(workdir):
    code, out = run_tables(workdir, 2)
    assert code == 0
    good = pl.read_csv(out).row(0, named=True)
    # k562 dir tuples: q1 up (.8, gene gA), q2 down (.3, gene gB): one class per gene ->
    # no per-gene AUROC; pooled 1.0 over 2. rpe1: q4 alone -> undefined.
    assert good["K562_auroc_per_gene"] is None and good["K562_n_genes"] == 0
    assert good["K562_auroc_pooled"] == 1.0 and good["K562_n"] == 2
    assert good["RPE1_auroc_pooled"] is None and good["RPE1_n"] == 1
    # paper protocol: q1 "up" -> 1 (up), q2 "down" -> 0 (down) -> 1; bad says "up" twice
    assert good["K562_auroc_paper"] == 1.0 and good["RPE1_auroc_paper"] is None
    assert pl.read_csv(out).row(1, named=True)["K562_auroc_paper"] == 0.5


def test_table3_metrics_ci_and_unseen(workdir):
    code, out = run_tables(workdir, 3)
    assert code == 0
    t = pl.read_csv(out)
    computed = t.filter(pl.col("kind") == "computed")
    assert computed.select("row", "cell").rows() == [
        ("good", "all"),
        ("good", "k562"),
        ("good", "rpe1"),
        ("bad", "all"),
        ("bad", "k562"),
        ("bad", "rpe1"),
    ]
    assert t.columns[:7] == ["split", "kind", "row", "cell", "n", "n_unparsed", "n_failed"]
    assert set(METRIC_NAMES) <= set(t.columns) and t.columns[-1] == "source"
    good_all = computed.row(0, named=True)
    # truth 0 2 1 0 2 0, answers 0 2 1 0 2 (unparsed): 5 of 6 right
    assert good_all["n"] == 6 and good_all["n_unparsed"] == 1
    assert good_all["accuracy"] == pytest.approx(5 / 6)
    assert good_all["recall_not_de"] == pytest.approx(2 / 3)
    assert good_all["precision_not_de"] == 1.0
    assert computed.row(2, named=True)["accuracy"] == 0.5  # rpe1: q4 right, q5 unparsed
    bad_all = computed.row(3, named=True)
    assert bad_all["accuracy"] == pytest.approx(3 / 6) and bad_all["mcc"] == 0.0
    reported = t.filter(pl.col("kind") == "reported").row(0, named=True)
    assert reported["row"] == "X" and reported["accuracy"] == 0.5 and reported["n"] is None
    assert reported["source"] == "paper table 3" and reported["paper"] == "P"
    assert t.columns[-2:] == ["paper", "source"]

    ci = pl.read_csv(workdir / "out" / "table3_ci.csv")
    assert ci.height == 2 * 3 * len(METRIC_NAMES)
    acc = ci.filter(
        (pl.col("row") == "good") & (pl.col("cell") == "all") & (pl.col("metric") == "accuracy")
    )
    assert acc["value"][0] == pytest.approx(5 / 6) and acc["n"][0] == 6 and acc["n_boot"][0] == 200
    assert acc["lo"][0] <= 5 / 6 <= acc["hi"][0]

    unseen = pl.read_csv(workdir / "out" / "table3_unseen.csv")
    rows = {(r["row"], r["cell"]): r for r in unseen.iter_rows(named=True)}
    # T1 and U1 have training rows: kept q1 (2 -> 2), q3 (0 -> 0), q5 (0 -> unparsed)
    assert rows[("good", "all")]["n"] == 3 and rows[("good", "all")]["n_all"] == 6
    assert rows[("good", "all")]["accuracy"] == pytest.approx(2 / 3)
    assert rows[("good", "k562")]["n"] == 2 and rows[("good", "k562")]["accuracy"] == 1.0
    assert rows[("good", "rpe1")]["n"] == 1 and rows[("good", "rpe1")]["accuracy"] == 0.0


def test_table4_only_the_held_out_cell_line(workdir):
    code, out = run_tables(workdir, 4, split="rpe1_holdout")
    assert code == 0
    t = pl.read_csv(out)
    assert t.select("row", "cell").rows() == [("good", "rpe1"), ("bad", "rpe1")]
    assert t["accuracy"].to_list() == [0.5, 0.5]
    assert pl.read_csv(workdir / "out" / "table4_ci.csv")["cell"].unique().to_list() == ["rpe1"]
    code, _ = run_tables(workdir, 4, split="default")
    assert code == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: f.filter(~((pl.col("qid") == 5) & (pl.col("task") == "de3"))),
            "1 of 6 questions have no de3",
        ),
        (
            lambda f: f.with_columns(
                label=pl.when(pl.col("qid") == 4).then(0).otherwise(pl.col("label"))
            ),
            "disagree with the questions",
        ),
        (lambda f: f.with_columns(score_de=pl.lit(None, dtype=pl.Float64)), "have no score_de"),
    ],
)
def test_bad_predictions_fail_clearly_and_write_nothing(workdir, capsys, damage, message):
    path = workdir / "predictions" / "default" / "good" / "rpe1" / "0.parquet"
    damage(pl.read_parquet(path)).write_parquet(path)
    code, out = run_tables(workdir, 1)
    assert code == 1
    assert message in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_packaged_reported_numbers_are_sourced():
    reported = pl.read_csv(default_reported_path())
    assert reported.columns == [
        "table",
        "split",
        "paper",
        "model",
        "cell",
        "metric",
        "value",
        "source",
    ]
    assert reported["source"].null_count() == 0 and (reported["source"].str.len_chars() > 20).all()
    assert reported["value"].is_between(0, 1).all()
    assert set(reported["metric"]) <= {"auroc_per_gene", "auroc_as_reported", *METRIC_NAMES}
    assert not reported.drop("value", "source").is_duplicated().any()
    for table in (1, 2):
        part = reported.filter(pl.col("table") == table)
        perturbqa = part.filter(pl.col("paper").str.starts_with("PerturbQA"))
        assert perturbqa.height == 9 * 4 and set(perturbqa["metric"]) == {"auroc_per_gene"}
        # the SynthPert paper's AUROC is of unknown kind: never filed as per-gene or pooled
        synthpert = part.filter(pl.col("paper").str.starts_with("SynthPert"))
        assert set(synthpert["metric"]) == {"auroc_as_reported"}
        assert synthpert.height == (9 if table == 1 else 8) * 4
    for table, split in ((3, "default"), (4, "rpe1_holdout")):
        part = reported.filter(pl.col("table") == table)
        assert set(part["split"]) == {split} and set(part["cell"]) == {"all"}
        assert set(part["model"]) == {"Base LLM", "SFT on data", "o4-mini", "SynthPert"}
    headline = reported.filter((pl.col("model") == "SynthPert") & (pl.col("metric") == "accuracy"))
    assert dict(zip(headline["table"], headline["value"])) == {3: 0.89, 4: 0.87}
    summer = reported.filter((pl.col("table") == 1) & (pl.col("model") == "SUMMER"))
    by_paper = {
        paper: dict(zip(part["cell"], part["value"]))
        for (paper,), part in summer.group_by("paper", maintain_order=True)
    }
    assert by_paper == {
        "PerturbQA (Wu et al., ICLR 2025)": {
            "k562": 0.62,
            "rpe1": 0.59,
            "hepg2": 0.62,
            "jurkat": 0.59,
        },
        # the SynthPert paper's copy differs in the second decimal (see REPORTED.md)
        "SynthPert (Phillips et al., 2025, arXiv:2509.25346v1)": {
            "k562": 0.6,
            "rpe1": 0.58,
            "hepg2": 0.61,
            "jurkat": 0.58,
        },
    }


def test_plots_write_pngs(workdir):
    files = [str(p) for p in (workdir / "predictions" / "default").rglob("*.parquet")]
    out = workdir / "plots"
    pl.DataFrame({"grade": ["excellent", "bad"], "cell": ["k562", "rpe1"], "n": [3, 1]}).write_csv(
        workdir / "g.csv"
    )
    log = workdir / "models" / "default" / "synthpert" / "train_log.csv"
    log.parent.mkdir(parents=True)
    pl.DataFrame({"step": [1, 2], "loss": [2.0, 1.5]}).write_csv(log)
    calls = [
        ["roc", "--task", "de3", "--predictions", *files],
        ["roc", "--task", "dir", "--predictions", *files],
        ["confusion", "--predictions", *files],
        ["grades", "--grades", str(workdir / "g.csv")],
        ["loss", "--logs", str(log)],
    ]
    for i, call in enumerate(calls):
        assert cli_main(["plots", *call, "--out", str(out / f"{i}.png")]) == 0
        assert (out / f"{i}.png").read_bytes()[:4] == b"\x89PNG"
    pl.DataFrame({"grade": ["superb"], "cell": ["k562"], "n": [1]}).write_csv(workdir / "bad.csv")
    assert (
        cli_main(
            ["plots", "grades", "--grades", str(workdir / "bad.csv"), "--out", str(out / "x.png")]
        )
        == 1
    )


def test_views_plots_of_tables_1_to_4_and_a_confusion_grid(workdir):
    out = workdir / "plots"
    for table, split in ((1, "default"), (2, "default"), (3, "default"), (4, "rpe1_holdout")):
        code, csv_path = run_tables(workdir, table, split=split)
        assert code == 0
        png = out / f"views_table{table}.png"
        assert cli_main(["plots", "views", "--table-file", str(csv_path), "--out", str(png)]) == 0
        assert png.read_bytes()[:4] == b"\x89PNG"
    # one panel per cell line (tables 1-2), per printed metric (tables 3-4)
    t1 = pl.read_csv(workdir / "out" / "table1.csv", infer_schema_length=None)
    assert len([ax for ax in views_figure(t1, "t1").axes if ax.get_visible()]) == 2
    t4 = pl.read_csv(workdir / "out" / "table4.csv", infer_schema_length=None)
    axes = [ax for ax in views_figure(t4, "t4").axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["accuracy", "f1_not_de", "f1_down", "f1_up"]
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["good", "bad"]  # table 4: the held-out cell line's rows
    bad = workdir / "bad_table.csv"
    pl.DataFrame({"kind": ["computed"], "row": ["x"], "n": [1]}).write_csv(bad)
    assert cli_main(["plots", "views", "--table-file", str(bad), "--out", str(out / "x.png")]) == 1

    # eight model rows: a grid three panels wide, not a strip of eight
    files = [str(p) for p in (workdir / "predictions" / "default").rglob("*.parquet")]
    preds = load_predictions(files)
    many = pl.concat([preds.with_columns(row=pl.lit(f"row{i}")) for i in range(8)])
    fig = confusion_figure(many)
    width, height = fig.get_size_inches()
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 8
    assert width == pytest.approx(3 * 3.6) and height == pytest.approx(3 * 3.4)


def test_failed_requests_are_counted_apart_and_never_scored(workdir):
    """Under evaluate.allow_failures a failed request is written with status `failed` and no
    prediction: the tables count it in n_failed, score the rest, and never read it as an
    unparsed answer (which would count as wrong) or as a 0.5 score."""
    clean1, clean3 = run_tables(workdir, 1)[1], run_tables(workdir, 3)[1]
    before1, before3 = pl.read_csv(clean1), pl.read_csv(clean3)
    failed = predictions(GOOD_DE3, GOOD_DIR, "label_mapping").filter(pl.col("cell") == "k562")
    failed = failed.with_columns(
        status=pl.lit("failed"), pred=pl.lit(None, pl.Int64), score_de=pl.lit(None, pl.Float64),
        score_up=pl.lit(None, pl.Float64), raw_text=pl.lit("http 400: content policy"),
    )  # fmt: skip
    good_k562 = workdir / "predictions" / "default" / "good" / "k562" / "0.parquet"
    kept = pl.read_parquet(good_k562)
    pl.concat([kept.filter(pl.col("qid") != 1), failed.filter(pl.col("qid") == 1)]).write_parquet(good_k562)

    t1 = pl.read_csv(run_tables(workdir, 1)[1]).filter(pl.col("row") == "good").row(0, named=True)
    assert t1["K562_n_failed"] == 1 and t1["K562_n"] == before1.row(0, named=True)["K562_n"] - 1
    assert before1.row(0, named=True)["K562_n_failed"] == 0
    t3 = pl.read_csv(run_tables(workdir, 3)[1])
    k562 = t3.filter((pl.col("row") == "good") & (pl.col("cell") == "k562")).row(0, named=True)
    was = before3.filter((pl.col("row") == "good") & (pl.col("cell") == "k562")).row(0, named=True)
    assert k562["n_failed"] == 1 and k562["n"] == was["n"] - 1 and k562["n_unparsed"] == was["n_unparsed"]
    assert k562["accuracy"] == 1.0  # the rest of k562 was answered right
