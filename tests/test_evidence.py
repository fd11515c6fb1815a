"""The evidence block (`evaluation.evidence`), its table step and its tool.

- the block's text on the hand-made split of test_baselines, worked out by hand;
- its neighbours are the knn row's (same neighbours, same votes);
- leakage: test labels permuted -> byte-identical blocks; for rpe1_holdout, RPE1's rows
  changed or removed -> the same numbers and text;
- its numbers equal plain-Python loops over the demo CSVs;
- `synthpert evidence-table` and `synthpert evidence` (reading the table, computing a
  block, and their errors).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import polars as pl
import pytest
from helpers import demo_config, step_settings
from test_baselines import ROWS, k562_questions, make_splits

from synthpert import cli
from synthpert.core.labels import CELLS, DOWN, NOT_DE, UP
from synthpert.core.settings import Evidence
from synthpert.evaluation import baselines, evidence

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "perturbqa-demo"
ALL = Evidence(gene=True, pair=True, neighbours=True, k=20, max_listed=5)


def prepared(results: Path, source: Path) -> Path:
    """results/ of the data step on `source` (both splits)."""
    data = results / "data"
    assert cli.main([
        "prepare", "--input-dir", str(source), "--cells", *CELLS, "--holdout", "rpe1",
        "--tuples", str(data / "tuples.parquet"), "--splits-dir", str(data / "splits"),
        "--table5", str(results / "table5.csv"),
    ]) == 0  # fmt: skip
    return results


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo subset: small, but no (pert, gene) pair is measured in two cell lines."""
    return prepared(tmp_path_factory.mktemp("evidence") / "results", DEMO)


@pytest.fixture(scope="module")
def full(tmp_path_factory, shared_perturbqa) -> Path:
    """The full PerturbQA data (its pairs recur across cell lines); questions are sampled."""
    return prepared(tmp_path_factory.mktemp("evidence_full") / "results", shared_perturbqa)


def split_of(results: Path, split: str) -> pl.DataFrame:
    return baselines.load_splits(results / "data" / "splits" / f"{split}.parquet")


def test_block_text_worked_out_by_hand():
    splits = make_splits()
    table = evidence.build(splits, k562_questions(splits), Evidence(True, True, True, 2, 5))
    assert table.columns == list(evidence.COLUMNS)
    g1 = table.filter(pl.col("gene") == "g1").row(0, named=True)
    assert g1["text"] == "\n".join([
        "Evidence from the training data:",
        "- g1 in K562: DE after 2 of 3 knockdowns (66.7%); 1 up, 1 down.",
        "- g1 in other cell lines: DE after 2 of 3 knockdowns (66.7%); 1 up, 1 down.",
        "- g1 after T1 knockdown in other cell lines: HepG2 not DE; RPE1 up.",
        "- g1 after the 2 knockdowns most similar to T1 (similarity): 2 measured it in K562, "
        "weighted DE 1.00, up 0.50: P1 (0.71) up; P2 (0.71) down.",
    ])  # fmt: skip
    # g2: rpe1's *test* row (T1 g2 up) is never read; its training row (not DE) is
    g2 = table.filter(pl.col("gene") == "g2").row(0, named=True)
    assert g2["pair_cells"] == ["rpe1"] and g2["pair_labels"] == [NOT_DE]
    g4 = table.filter(pl.col("gene") == "g4").row(0, named=True)
    assert "- g4 in K562: no training knockdown measured it." in g4["text"]
    assert "g4 after T1 knockdown in other cell lines: not measured." in g4["text"]
    assert "none measured it in K562" in g4["text"]
    block = evidence.render_json(g1)
    assert '"weighted_up": 0.5' in block and '"text": "Evidence from the training data:' in block


def test_sources_and_sizes_follow_the_settings():
    splits = make_splits()
    asked = k562_questions(splits)
    only_pair = evidence.build(splits, asked, Evidence(False, True, False, 2, 5))
    text = only_pair.filter(pl.col("gene") == "g1")["text"][0]
    assert text.splitlines()[1:] == ["- g1 after T1 knockdown in other cell lines: HepG2 not DE; RPE1 up."]
    assert only_pair["gene_cell_n"].null_count() == only_pair.height
    one = evidence.build(splits, asked, Evidence(True, True, True, 2, 1))
    assert one.filter(pl.col("gene") == "g1")["text"][0].endswith(": P1 (0.71) up; +1 more.")
    # the demo configuration: every source, k = evaluate.knn_k
    settings = step_settings("evidence")
    assert settings == Evidence(True, True, True, 20, 5)
    assert step_settings("evidence", demo_config(**{"evidence.k": 3})).k == 3
    assert settings.run() == {}  # every field decides the text


def test_neighbours_are_the_knn_rows():
    # the extra row gives P1 and P2 a shared profile (test_baselines' threshold test)
    splits = make_splits([*ROWS, ("rpe1", "P2", "g1", 2, "train")])
    asked = k562_questions(make_splits())
    for k in (1, 2, 20):
        table = evidence.build(splits, asked, Evidence(True, True, True, k, 5))
        knn = baselines.predict("knn", splits, asked, "k562", k).filter(pl.col("task") == "de3")
        got = table.join(knn.select("gene", "score_de"), on="gene").filter(pl.col("nn_measured") > 0)
        assert got.height > 0
        assert got["nn_de"].to_list() == pytest.approx(got["score_de"].to_list())
        neighbours = baselines.nearest_neighbours(splits.filter(pl.col("role") == "train"), "k562", ["T1"], k)
        assert table["nn_found"].to_list() == [neighbours.height] * table.height


def permuted_test_labels(splits: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The same split with every test row given another test row's label."""
    test = splits.filter(pl.col("role") == "test")
    labels = test["label"].shuffle(seed=seed)
    changed = test.with_columns(label=labels, de=(labels != NOT_DE).cast(pl.Int64))
    assert (changed["label"] != test["label"]).any()
    return pl.concat([splits.filter(pl.col("role") == "train"), changed]).sort("cell", "pert", "gene")


@pytest.mark.parametrize("split", ["default", "rpe1_holdout"])
def test_blocks_never_read_a_test_label(demo, full, split):
    for results, asked_count, seeds in ((demo, None, (1, 2)), (full, 1000, (1,))):
        splits = split_of(results, split)
        asked = splits if asked_count is None else splits.sample(asked_count, seed=7)  # questions and training tuples
        before = evidence.build(splits, asked, ALL)
        assert set(before["role"]) == {"train", "test"}
        for seed in seeds:
            after = evidence.build(permuted_test_labels(splits, seed), asked, ALL)
            assert after.equals(before)
            assert after["text"].to_list() == before["text"].to_list()


def test_rpe1_holdout_takes_nothing_from_rpe1(demo):
    splits = split_of(demo, "rpe1_holdout")
    asked = splits.filter(pl.col("role") == "test").select("cell", "pert", "gene")
    assert set(asked["cell"]) == {"rpe1"}
    table = evidence.build(splits, asked, ALL)
    # RPE1's rows relabelled at random, or gone altogether: the same numbers and text
    rng = random.Random(0)
    relabelled = splits.with_columns(
        label=pl.when(pl.col("cell") == "rpe1")
        .then(pl.Series([rng.choice([NOT_DE, DOWN, UP]) for _ in range(splits.height)]))
        .otherwise(pl.col("label"))
    ).with_columns(de=(pl.col("label") != NOT_DE).cast(pl.Int64))
    assert evidence.build(relabelled, asked, ALL).equals(table)
    gone = evidence.build(splits.filter(pl.col("cell") != "rpe1"), asked, ALL)
    assert gone.drop("role").equals(table.drop("role"))
    assert set(table["gene_cell_n"]) == {0} and set(table["nn_source"]) == {"other"}
    assert "rpe1" not in set(table["pair_cells"].explode().drop_nulls())
    listed = table["nn_listed"].explode().struct.field("pert").drop_nulls()
    rpe1_only = set(splits.filter(pl.col("cell") == "rpe1")["pert"]) - set(
        splits.filter(pl.col("cell") != "rpe1")["pert"]
    )
    assert not set(listed) & rpe1_only


@pytest.fixture(scope="module")
def raw(shared_perturbqa) -> dict[str, list[dict]]:
    return raw_rows(shared_perturbqa)


def raw_rows(folder: Path) -> dict[str, list[dict]]:
    """Every row of a folder's CSVs, three-class labelled, by plain Python; by gene."""
    by_gene: dict[str, list[dict]] = {}
    for cell in CELLS:
        with open(folder / f"{cell}-dir.csv") as f:
            up = {(r["pert"], r["gene"]): r["label"] == "1" for r in csv.DictReader(f)}
        with open(folder / f"{cell}-de.csv") as f:
            for r in csv.DictReader(f):
                key = (r["pert"], r["gene"])
                label = NOT_DE if r["label"] == "0" else (UP if up[key] else DOWN)
                row = {"cell": cell, "pert": r["pert"], "label": label, "split": r["split"]}
                by_gene.setdefault(r["gene"], []).append(row)
    return by_gene


def expected(rows: list[dict], split: str, cell: str, pert: str) -> dict:
    """Gene counts and the pair in other cell lines, by a loop over the gene's raw rows."""

    def training(r):
        return r["cell"] != "rpe1" if split == "rpe1_holdout" else r["split"] == "train"

    got = {k: 0 for k in evidence.COUNTS}
    pairs = []
    for r in rows:
        if not training(r) or (r["cell"], r["pert"]) == (cell, pert):
            continue
        where = "gene_cell" if r["cell"] == cell else "gene_other"
        got[f"{where}_n"] += 1
        got[f"{where}_de"] += r["label"] != NOT_DE
        got[f"{where}_up"] += r["label"] == UP
        if r["cell"] != cell and r["pert"] == pert:
            pairs.append((r["cell"], r["label"]))
    got["pairs"] = sorted(pairs)
    return got


@pytest.mark.parametrize("split", ["default", "rpe1_holdout"])
def test_numbers_equal_loops_over_the_csvs(full, raw, split):
    splits = split_of(full, split)
    # a sample of questions, and of training tuples (counted without their own row)
    # and questions whose pair another cell line measured (few: genes are sampled per cell line)
    other = splits.select("pert", "gene", other=pl.col("cell"))
    paired = splits.join(other, on=["pert", "gene"]).filter(pl.col("cell") != pl.col("other"))
    sample = pl.concat([
        splits.filter(pl.col("role") == "test").sample(300, seed=3),
        splits.filter(pl.col("role") == "train").sample(100, seed=4),
        paired.select(splits.columns).unique().sort("cell", "pert", "gene").sample(100, seed=5),
    ])  # fmt: skip
    table = evidence.build(splits, sample, ALL)
    assert table.height > 450 and (table["pair_cells"].list.len() > 0).sum() >= 80
    for row in table.iter_rows(named=True):
        want = expected(raw[row["gene"]], split, row["cell"], row["pert"])
        assert {k: row[k] for k in evidence.COUNTS} == {k: want[k] for k in evidence.COUNTS}, row["text"]
        assert list(zip(row["pair_cells"], row["pair_labels"])) == want["pairs"], row["text"]


def run(*argv: str) -> int:
    return cli.main(list(argv))


def test_table_step_and_tool(demo, capsys):
    settings = step_settings("evidence")
    splits_file = demo / "data" / "splits" / "default.parquet"
    questions = demo / "eval" / "default" / "questions.parquet"
    assert run("questions", "--split-file", str(splits_file), "--settings", '{"sample": {"fraction": null, '
               '"count": null, "seed": 88, "balanced": false}}', "--out", str(questions)) == 0  # fmt: skip
    out = demo / "evidence" / "default.parquet"
    assert run(
        "evidence-table", "--splits-file", str(splits_file), "--questions", str(questions),
        "--settings", settings.params_json(), "--run", settings.run_json(), "--out", str(out),
    ) == 0  # fmt: skip
    table = pl.read_parquet(out)
    asked = pl.read_parquet(questions)
    assert table.height == asked.height and set(table["role"]) == {"test"}
    assert not list(out.parent.glob(".*.part"))

    row = table.sample(1, seed=5).row(0, named=True)
    question = ["--cell", row["cell"].upper(), "--pert", row["pert"].lower(), "--gene", row["gene"]]
    common = ["--results", str(demo), "--config", str(REPO / "config" / "demo.yaml")]
    capsys.readouterr()
    assert run("evidence", *question, *common) == 0
    assert capsys.readouterr().out == row["text"] + "\n"
    assert run("evidence", *question, *common, "--json") == 0
    assert f'"pert": "{row["pert"]}"' in capsys.readouterr().out
    # a block the table lacks is computed, the same way
    out.unlink()
    assert run("evidence", *question, *common) == 0
    assert capsys.readouterr().out == row["text"] + "\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--split", "rpe1_holdot"), "unknown split 'rpe1_holdot'"),
        (("--cell", "K56"), "unknown cell line 'K56'"),
        (("--pert", "INTS5X"), "unknown perturbation 'INTS5X'"),
        (("--gene", "HSPA1"), "unknown gene 'HSPA1': not measured in K562"),
    ],
)
def test_tool_names_what_it_does_not_know(demo, capsys, change, message):
    args = {"--split": "default", "--cell": "K562", "--pert": "INTS5", "--gene": "HSPA1A"}
    args[change[0]] = change[1]
    argv = [x for pair in args.items() for x in pair]
    assert run("evidence", *argv, "--results", str(demo)) == 1
    err = capsys.readouterr().err
    assert message in err and "closest known" in err
