"""Baseline rows on a tiny hand-made split; every expected score is worked out below.

Split (label: 0 not DE, 1 down, 2 up):

    k562 train:  P1 g1 up | P1 g2 0 | P2 g1 down | P2 g2 0 | P3 g1 0 | P3 g3 up
    k562 test:   T1 g1 up | T1 g2 0 | T1 g4 0          <- the questions
    rpe1 train:  T1 g1 up | T1 g2 0 | P1 g1 down
    rpe1 test:   T1 g2 up                               <- must never be read
    hepg2 train: T1 g1 0  | T1 g5 up | P2 g5 up
"""

from __future__ import annotations

import polars as pl
import pytest

from synthpert.cli import main as cli_main
from synthpert.evaluation import baselines

ROWS = [
    ("k562", "P1", "g1", 2, "train"),
    ("k562", "P1", "g2", 0, "train"),
    ("k562", "P2", "g1", 1, "train"),
    ("k562", "P2", "g2", 0, "train"),
    ("k562", "P3", "g1", 0, "train"),
    ("k562", "P3", "g3", 2, "train"),
    ("k562", "T1", "g1", 2, "test"),
    ("k562", "T1", "g2", 0, "test"),
    ("k562", "T1", "g4", 0, "test"),
    ("rpe1", "T1", "g1", 2, "train"),
    ("rpe1", "T1", "g2", 0, "train"),
    ("rpe1", "P1", "g1", 1, "train"),
    ("rpe1", "T1", "g2", 2, "test"),
    ("hepg2", "T1", "g1", 0, "train"),
    ("hepg2", "T1", "g5", 2, "train"),
    ("hepg2", "P2", "g5", 2, "train"),
]


def make_splits(rows=ROWS) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema=["cell", "pert", "gene", "label", "role"], orient="row")
    return frame.with_columns(
        de=(pl.col("label") != 0).cast(pl.Int64),
        direction=pl.when(pl.col("label") == 0)
        .then(None)
        .otherwise((pl.col("label") == 2).cast(pl.Int64)),
        split=pl.col("role"),
    ).select("cell", "pert", "gene", "de", "direction", "label", "split", "role")


def k562_questions(splits: pl.DataFrame) -> pl.DataFrame:
    asked = splits.filter((pl.col("cell") == "k562") & (pl.col("role") == "test"))
    return asked.with_row_index("qid").select(
        "qid", "cell", "pert", "gene", "de", "direction", "label"
    )


def scores(row: str, k: int = 20, splits: pl.DataFrame | None = None) -> dict[str, dict]:
    """{gene: {score_de, score_up, pred_de3, pred_dir}} for the k562 questions."""
    splits = make_splits() if splits is None else splits
    asked = k562_questions(splits)
    preds = baselines.predict(row, splits, asked, "k562", k)
    out = {}
    for gene in asked["gene"]:
        mine = preds.filter(pl.col("gene") == gene)
        de3 = mine.filter(pl.col("task") == "de3").row(0, named=True)
        direction = mine.filter(pl.col("task") == "dir")
        out[gene] = {
            "score_de": de3["score_de"],
            "pred_de3": de3["pred"],
            "score_up": direction["score_up"][0] if direction.height else None,
            "pred_dir": direction["pred"][0] if direction.height else None,
        }
    return out


def test_majority_is_the_training_mode_of_the_cell_line():
    got = scores("majority")
    # k562 train labels: 0 x3, 2 x2, 1 x1 -> not DE; DE rows: 2 up of 3 -> up
    assert {g: v["pred_de3"] for g, v in got.items()} == {"g1": 0, "g2": 0, "g4": 0}
    assert got["g1"]["pred_dir"] == 2 and got["g1"]["score_up"] == 0.5
    assert {v["score_de"] for v in got.values()} == {0.0}


def test_transfer_reads_only_other_cell_lines_training_rows():
    got = scores("transfer")
    # T1 in the other cell lines' training rows: g1 (rpe1 1, hepg2 0), g2 (rpe1 0), g5 (hepg2 1)
    # -> perturbation DE rate 2/4 = 0.5, weighted 0.001
    # g1: pair mean 1/2 -> 0.5 + 0.0005; up among its DE rows: 1/1
    assert got["g1"]["score_de"] == pytest.approx(0.5005)
    assert got["g1"]["score_up"] == pytest.approx(1.0)
    assert got["g1"]["pred_de3"] == 2 and got["g1"]["pred_dir"] == 2
    # g2: only rpe1's *training* row (not DE) counts; its test row (up) must not
    assert got["g2"]["score_de"] == pytest.approx(0.0005)
    assert got["g2"]["pred_de3"] == 0
    # g4: never seen elsewhere -> only the perturbation term
    assert got["g4"]["score_de"] == pytest.approx(0.0005)
    assert got["g4"]["pred_de3"] == 0


def test_gene_prior_scores_and_leave_one_out_threshold():
    got = scores("gene_prior")
    # k562 training: g1 DE in 2 of 3 (up 1 of 2), g2 in 0 of 2, g4 unseen -> overall 3/6
    assert got["g1"]["score_de"] == pytest.approx(2 / 3)
    assert got["g1"]["score_up"] == pytest.approx(0.5)
    assert got["g2"]["score_de"] == 0.0
    assert got["g4"]["score_de"] == pytest.approx(0.5)
    # leave-one-out training scores: P1g1 1/2, P1g2 0, P2g1 1/2, P2g2 0, P3g1 2/2,
    # P3g3 alone -> 0.5. Training DE rate 3/6 -> top ceil(3) scores 1, .5, .5 -> t = 0.5
    assert got["g1"]["pred_de3"] == 2  # 2/3 >= 0.5, up score 0.5 >= 0.5 -> up
    assert got["g2"]["pred_de3"] == 0
    assert got["g4"]["pred_de3"] == 2  # 0.5 >= 0.5
    assert got["g1"]["pred_dir"] == 2


def test_knn_neighbours_from_other_cell_lines_profiles():
    # Profiles (DE in other cell lines' training rows): T1 {rpe1 g1, hepg2 g5},
    # P1 {rpe1 g1}, P2 {hepg2 g5}, P3 {} -> cos(T1, P1) = cos(T1, P2) = 1/sqrt(2), P3 0.
    got = scores("knn", k=2)
    # g1: P1 DE up, P2 DE down, equal weights -> DE 1.0, up 0.5
    assert got["g1"]["score_de"] == pytest.approx(1.0)
    assert got["g1"]["score_up"] == pytest.approx(0.5)
    # g2: both neighbours measured it, not DE -> 0
    assert got["g2"]["score_de"] == 0.0
    # g4: no neighbour measured it -> gene prior (unknown gene: overall rate 0.5)
    assert got["g4"]["score_de"] == pytest.approx(0.5)
    # training perturbations have no positive neighbour among the others (P1 and P2
    # share nothing; P3 is empty): leave-one-out scores are the gene prior's -> t = 0.5
    assert [got[g]["pred_de3"] for g in ("g1", "g2", "g4")] == [2, 0, 2]


def test_knn_breaks_similarity_ties_by_name():
    got = scores("knn", k=1)  # P1 and P2 tie; P1 comes first -> only P1 votes
    assert got["g1"]["score_de"] == pytest.approx(1.0)
    assert got["g1"]["score_up"] == pytest.approx(1.0)


def test_knn_with_one_cell_line_has_no_neighbour_and_falls_back_to_the_prior():
    # No other cell line: no profile to compare, so no neighbour (and no crash on the empty
    # feature vocabulary), and every score is the gene prior's.
    k562 = make_splits().filter(pl.col("cell") == "k562")
    train = k562.filter(pl.col("role") == "train")
    assert baselines.nearest_neighbours(train, "k562", ["T1"], 2).height == 0
    assert scores("knn", splits=k562) == scores("gene_prior", splits=k562)


def test_knn_uses_training_neighbours_for_its_threshold():
    # Give P1 and P2 a shared profile: then each is the other's neighbour and the
    # leave-one-out scores of their genes come from the neighbour, not the prior.
    extra = [("rpe1", "P2", "g1", 2, "train")]
    splits = make_splits(ROWS + extra)
    got = scores("knn", k=1, splits=splits)
    # T1 profile {rpe1 g1, hepg2 g5}; P1 {rpe1 g1}: 1/sqrt2; P2 {rpe1 g1, hepg2 g5}: 1
    # -> k=1 picks P2: g1 DE (down) -> DE 1, up 0; g2 not DE -> 0
    assert got["g1"]["score_de"] == pytest.approx(1.0)
    assert got["g1"]["score_up"] == pytest.approx(0.0)
    assert got["g1"]["pred_de3"] == 1 and got["g1"]["pred_dir"] == 1
    assert got["g2"]["pred_de3"] == 0


def test_holdout_cell_line_falls_back_to_other_cell_lines():
    splits = make_splits().with_columns(
        role=pl.when(pl.col("cell") == "k562").then(pl.lit("test")).otherwise(pl.lit("train"))
    )
    got = scores("gene_prior", splits=splits)
    # k562 has no training rows: the prior uses rpe1 + hepg2 (+ rpe1's former test row,
    # now training): g1 DE in 2 of 3 rows, g2 in 1 of 2
    assert got["g1"]["score_de"] == pytest.approx(2 / 3)
    assert got["g2"]["score_de"] == pytest.approx(1 / 2)
    assert scores("knn", splits=splits)["g1"]["score_de"] is not None


def test_predictions_format():
    splits = make_splits()
    asked = k562_questions(splits)
    preds = baselines.predict("transfer", splits, asked, "k562")
    assert preds.columns == [
        "qid",
        "cell",
        "pert",
        "gene",
        "label",
        "task",
        "raw_text",
        "pred",
        "status",
        "score_de",
        "score_up",
        "score_source",
    ]
    # a de3 row per question, a dir row for the one DE question
    assert preds.group_by("task").len().sort("task").rows() == [("de3", 3), ("dir", 1)]
    assert set(preds["status"]) == {"answered"} and set(preds["raw_text"]) == {""}
    assert set(preds["score_source"]) == {"probabilities"}
    assert preds.filter(pl.col("task") == "de3")["score_up"].null_count() == 3
    assert preds.filter(pl.col("task") == "dir")["score_de"].null_count() == 1


def test_cli_one_cell_per_call_with_its_settings(tmp_path, capsys):
    splits = make_splits()
    splits.write_parquet(tmp_path / "splits.parquet")
    k562_questions(splits).write_parquet(tmp_path / "questions.parquet")

    def run(cell, settings, out, split_file="splits.parquet"):
        return cli_main(
            ["baseline", "--row", "knn", "--cell", cell,
             "--splits-file", str(tmp_path / split_file),
             "--questions", str(tmp_path / "questions.parquet"),
             "--settings", settings, "--out", str(tmp_path / out)]
        )  # fmt: skip

    assert run("k562", '{"knn_k": 1}', "k1.parquet") == 0
    assert run("k562", '{"knn_k": 20}', "k20.parquet") == 0
    up = {}
    for name in ("k1", "k20"):
        frame = pl.read_parquet(tmp_path / f"{name}.parquet")
        assert frame.height == 4  # 3 de3 rows + 1 dir row
        up[name] = frame.filter(pl.col("task") == "dir")["score_up"][0]
    assert up == {"k1": 1.0, "k20": 0.5}  # knn_k reaches the row (see the tie-break test)
    assert run("rpe1", '{"knn_k": 20}', "rpe1.parquet") == 0
    assert pl.read_parquet(tmp_path / "rpe1.parquet").height == 0  # asked nothing there
    # bad input: a clear error and no output
    splits.drop("role").write_parquet(tmp_path / "bad.parquet")
    assert run("k562", '{"knn_k": 20}', "bad_out.parquet", split_file="bad.parquet") == 1
    assert "lacks columns ['role']" in capsys.readouterr().err
    assert run("k562", '{"knn_k": null}', "no_k.parquet") == 1  # the knn row needs its k
    assert "the knn row needs" in capsys.readouterr().err and not (tmp_path / "no_k.parquet").exists()
    assert not (tmp_path / "bad_out.parquet").exists()
