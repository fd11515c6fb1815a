"""`synthpert score-screens`: cell-eval DE tables from predictions and screens, and
cell-eval's own DE metrics on them (a perfect screen scores 1, a shuffled one about 0.5)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

pytest.importorskip("cell_eval")

from cell_eval import DEResults, initialize_de_comparison  # noqa: E402

from synthpert.cli import main as cli_main  # noqa: E402
from synthpert.errors import CommandError  # noqa: E402
from synthpert.evaluation import celleval  # noqa: E402

PERTS = [f"P{i}" for i in range(12)]
GENES = [f"G{i}" for i in range(80)]


def measured(seed: int = 0) -> pl.DataFrame:
    """Every (pert, gene) with a three-class label: about 20% DE, half of them up."""
    rng = np.random.default_rng(seed)
    n = len(PERTS) * len(GENES)
    de = rng.random(n) < 0.2
    label = np.where(de, np.where(rng.random(n) < 0.5, 2, 1), 0)
    return pl.DataFrame(
        {
            "pert": np.repeat(PERTS, len(GENES)),
            "gene": np.tile(GENES, len(PERTS)),
            "label": label,
        }
    )


def screen_frames(seed: int = 0, shuffled: bool = False) -> list[pl.DataFrame]:
    """One screen per perturbation whose answers are the labels (P(change) 1 for a measured
    change, else 0; direction +-1 for a change, a tiny random sign otherwise), or those
    answers shuffled among the genes of the perturbation."""
    rng = np.random.default_rng(seed + 1)
    frames = []
    for (pert,), part in measured(seed).group_by("pert", maintain_order=True):
        label = part["label"].to_numpy()
        p_change = (label != 0).astype(float)
        direction = np.where(label == 2, 1.0, np.where(label == 1, -1.0, rng.choice([-0.01, 0.01], label.size)))
        if shuffled:
            order = rng.permutation(label.size)
            p_change, direction = p_change[order], direction[order]
        frames.append(
            part.with_columns(
                model=pl.lit("m"),
                cell=pl.lit("k562"),
                p_change=pl.Series(p_change),
                direction=pl.Series(direction),
                label=pl.col("label").cast(pl.Int64),
            )
        )
    return frames


def run(tmp_path, frames, extra=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        path = tmp_path / f"screen{i}.parquet"
        frame.write_parquet(path)
        paths.append(str(path))
    out = tmp_path / "scores.csv"
    args = ["score-screens", "--screens", *paths, "--tables", str(tmp_path / "tables"), "--plot", str(tmp_path / "auroc.png")]
    assert cli_main([*args, *extra, "--out", str(out)]) == 0
    return pl.read_csv(out), pl.read_csv(tmp_path / "scores_per_pert.csv")


def test_exported_tables_pass_cell_evals_own_validation():
    labels = measured()
    answers = screen_frames()[0]
    pred = celleval.predicted_table(answers, p_de="p_change", direction="direction")
    real = celleval.real_from_labels(labels.filter(pl.col("pert") == "P0"))
    stats = labels.with_columns(
        log2fc=pl.when(pl.col("label") == 2).then(1.5).when(pl.col("label") == 1).then(-2.0).otherwise(0.1),
        pvalue=pl.when(pl.col("label") != 0).then(1e-6).otherwise(0.4),
        padj=pl.when(pl.col("label") != 0).then(1e-4).otherwise(None),  # an untested gene
    )
    for table, name in ((pred, "pred"), (real, "real"), (celleval.real_from_stats(stats), "stats")):
        assert table.columns == list(celleval.DE_COLUMNS)
        DEResults(table, name=name)  # cell-eval's check: raises on a missing column
        celleval.validate(table, name)
    comparison = initialize_de_comparison(real=real, pred=pred)  # same perturbations
    assert comparison.n_perts == 1
    # the documented mapping: fdr = 1 - P(DE), abs_log2_fold_change = P(DE), lfc = direction
    row = pred.filter(pl.col("feature") == answers.filter(pl.col("label") == 1)["gene"][0]).row(0, named=True)
    assert row["fdr"] == row["p_value"] == 0.0 and row["log2_fold_change"] == -1.0
    assert row["abs_log2_fold_change"] == 1.0
    with pytest.raises(CommandError, match="repeats"):
        celleval.validate(pl.concat([pred, pred.head(1)]), "pred")
    with pytest.raises(CommandError, match="lack columns"):
        celleval.validate(pred.drop("fdr"), "pred")


def test_evaluation_answers_take_the_direction_question_where_it_was_asked():
    preds = pl.DataFrame(
        {
            "qid": [0, 1, 2, 1],
            "pert": ["P", "P", "P", "P"],
            "gene": ["a", "b", "c", "b"],
            "label": [0, 1, 0, 1],
            "task": ["de3", "de3", "de3", "dir"],
            "pred": [1, 2, 0, 1],
            "score_de": [0.7, 0.9, 0.1, None],
            "score_up": [None, None, None, 0.2],
        }
    )
    answers = celleval.evaluation_answers(preds).sort("gene")
    # a: no direction question, three-class answer "down"; b: asked, P(up) .2 -> .2 - .5
    # (though its three-class answer said up); c: answered not DE -> no direction
    assert answers["direction"].to_list() == pytest.approx([-1.0, -0.3, 0.0])
    assert answers["p_de"].to_list() == [0.7, 0.9, 0.1]


def test_screens_equal_to_the_labels_score_one_and_shuffled_about_half(tmp_path):
    means, per_pert = run(tmp_path / "perfect", screen_frames())
    perfect = means.row(0, named=True)
    assert perfect["kind"] == "screen" and perfect["n_perts"] == len(PERTS)
    assert perfect["n_genes"] == len(PERTS) * len(GENES)
    assert perfect["roc_auc"] == pytest.approx(1.0) and perfect["de_direction_match"] == pytest.approx(1.0)
    assert perfect["pr_auc"] == pytest.approx(1.0) and perfect["de_sig_genes_recall"] == pytest.approx(1.0)
    assert per_pert.height == len(PERTS) and (per_pert["roc_auc"] == 1.0).all()
    shuffled = run(tmp_path / "shuffled", screen_frames(shuffled=True))[0].row(0, named=True)
    assert shuffled["roc_auc"] == pytest.approx(0.5, abs=0.08)
    assert shuffled["de_direction_match"] == pytest.approx(0.5, abs=0.15)
    tables = tmp_path / "perfect" / "tables" / "screens" / "m" / "k562"
    assert sorted(p.name for p in tables.iterdir())[:2] == ["P0.pred.csv", "P0.real.csv"]
    assert (tmp_path / "perfect" / "auroc.png").stat().st_size > 0


def test_evaluation_rows_and_derived_statistics(tmp_path):
    """Rows' predictions are scored per cell line; a derived cell's real side is its statistics."""
    labels = measured().filter(pl.col("pert").is_in(PERTS[:4])).with_row_index("qid")
    base = labels.with_columns(cell=pl.lit("k562"), raw_text=pl.lit(""), status=pl.lit("answered"),
                               score_source=pl.lit("probabilities"))  # fmt: skip
    oracle_de3 = base.with_columns(
        task=pl.lit("de3"), pred=pl.col("label"), score_de=(pl.col("label") != 0).cast(pl.Float64),
        score_up=pl.lit(None, dtype=pl.Float64),
    )  # fmt: skip
    oracle_dir = base.filter(pl.col("label") != 0).with_columns(
        task=pl.lit("dir"), pred=pl.col("label"), score_de=pl.lit(None, dtype=pl.Float64),
        score_up=(pl.col("label") == 2).cast(pl.Float64),
    )  # fmt: skip
    folder = tmp_path / "predictions" / "oracle"
    folder.mkdir(parents=True)
    pl.concat([oracle_de3, oracle_dir]).write_parquet(folder / "k562.parquet")
    stats = labels.with_columns(
        log2fc=pl.when(pl.col("label") == 2).then(1.0).when(pl.col("label") == 1).then(-1.0).otherwise(0.0),
        pvalue=pl.when(pl.col("label") != 0).then(1e-5).otherwise(0.5),
        padj=pl.when(pl.col("label") != 0).then(1e-3).otherwise(0.9),
    ).select("pert", "gene", "log2fc", "pvalue", "padj")
    stats.write_parquet(tmp_path / "stats.parquet")
    for extra in ([], ["--stats", f"k562={tmp_path / 'stats.parquet'}"]):
        out = tmp_path / f"run{len(extra)}"
        args = ["score-screens", "--predictions", str(folder / "k562.parquet"), *extra]
        args += ["--tables", str(out / "tables"), "--plot", str(out / "p.png"), "--out", str(out / "s.csv")]
        assert cli_main(args) == 0
        row = pl.read_csv(out / "s.csv").row(0, named=True)
        assert (row["kind"], row["name"], row["cell"], row["n_perts"]) == ("row", "oracle", "k562", 4)
        assert row["roc_auc"] == pytest.approx(1.0) and row["de_direction_match"] == pytest.approx(1.0)
        assert (out / "tables" / "rows" / "oracle" / "k562.pred.csv").is_file()


def test_bad_input_is_refused(tmp_path):
    frame = screen_frames()[0].drop("direction")
    frame.write_parquet(tmp_path / "bad.parquet")
    base = ["--tables", str(tmp_path / "t"), "--plot", str(tmp_path / "p.png"), "--out", str(tmp_path / "s.csv")]
    assert cli_main(["score-screens", "--screens", str(tmp_path / "bad.parquet"), *base]) != 0
    assert cli_main(["score-screens", "--stats", "k562", "--screens", str(tmp_path / "bad.parquet"), *base]) != 0
    assert cli_main(["score-screens", *base]) != 0
    assert not (tmp_path / "s.csv").exists()
