"""Your own screen: `synthpert derive` on synthetic Perturb-seq screens made here
(negative-binomial counts with planted up- and down-regulated genes), its checks, its
configuration, and config/own_screen.yaml through the real Snakemake."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from helpers import REPO, change, step_settings

from synthpert.core import config as cfg
from synthpert.core.settings import Derive
from synthpert.derivation.calls import adjust, split_perturbations
from synthpert.errors import CommandError, ConfigError
from synthpert.steps import derive as step
from synthpert.steps.prepare import build_tuples

pytest.importorskip("pydeseq2")
pytest.importorskip("scanpy")

spec = importlib.util.spec_from_file_location("make_own_screen", REPO / "scripts" / "make_own_screen.py")
make_own_screen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_own_screen)

PERTS = [f"P{i:02d}" for i in range(16)]
GENES = [f"G{i:03d}" for i in range(100)]


def settings(**changes) -> Derive:
    base = dict(
        perturbation_column="perturbation", control="non-targeting", layer="counts", replicate_column=None,
        pseudo_replicates=3, method="deseq2", correction="benjamini-hochberg", fdr=0.05, min_cells=20,
        min_mean_count=0.05, test_fraction=0.25, seed=0,
    )
    return Derive(**(base | changes))


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """(path, planted effects): 16 perturbations x 40 cells, 300 control cells, 100 genes."""
    adata, planted = make_own_screen.synthetic_screen(PERTS, GENES, 40, 300, seed=7)
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    adata.write_h5ad(path)
    return path, planted


def write_variant(tmp_path, edit) -> Path:
    """The fixture's kind of screen, changed by `edit(adata)`."""
    adata, _ = make_own_screen.synthetic_screen(PERTS[:4], GENES[:30], 25, 60, seed=1)
    edit(adata)
    path = tmp_path / "variant.h5ad"
    adata.write_h5ad(path)
    return path


NO_PDEX = pytest.mark.skipif(importlib.util.find_spec("pdex") is None, reason="pdex not installed (extra celleval)")


@pytest.mark.parametrize("method", ["deseq2", "wilcoxon", pytest.param("pdex", marks=NO_PDEX)])
def test_planted_effects_are_recovered_with_their_direction(screen, method):
    path, planted = screen
    stats, summary = step.derive(path, settings(method=method))
    called = {(p, g): d for p, g, d in stats.filter(pl.col("de") == 1).select("pert", "gene", "direction").iter_rows()}
    hits = planted.keys() & called.keys()
    precision, recall = len(hits) / len(called), len(hits) / len(planted)
    wrong_direction = [k for k in hits if (planted[k] > 0) != (called[k] == 1)]
    print(
        f"\n{method}: {len(planted)} planted DE tuples, {len(called)} called, {len(hits)} right: "
        f"precision {precision:.3f}, recall {recall:.3f}, wrong directions {len(wrong_direction)}, "
        f"{summary['seconds']} s"
    )
    assert precision >= 0.8 and recall >= 0.8
    assert not wrong_direction
    assert summary["tuples"] == stats.height == len(PERTS) * len(GENES) - sum(p in GENES for p in PERTS)
    assert summary["de"] == len(called) and summary["up"] + summary["down"] == len(called)
    # the statistics beside the labels, one split per perturbation, seeded
    assert {"log2fc", "pvalue", "padj", "n_cells"} <= set(stats.columns)
    assert (stats["n_cells"] == 40).all()
    per_pert = stats.group_by("pert").agg(pl.col("split").n_unique())
    assert (per_pert["split"] == 1).all()
    assert stats.filter(pl.col("split") == "test")["pert"].n_unique() == 4  # 25% of 16


def test_deseq2_fits_in_worker_processes_give_the_same_statistics(screen):
    path, _ = screen
    alone, _ = step.derive(path, settings(), threads=1)
    pooled, _ = step.derive(path, settings(), threads=2)
    assert pooled.equals(alone)


def test_main_writes_perturbqa_files_that_prepare_reads(screen, tmp_path):
    path, _ = screen
    out = tmp_path / "derived" / "mine"
    args = step_args(path, out, settings())
    step.main(args)
    tuples = build_tuples(tmp_path / "nowhere", ["mine"], {"mine": out})
    stats = pl.read_parquet(out / "stats.parquet")
    assert tuples.height == stats.height
    assert tuples.join(stats, on=["pert", "gene"]).filter(pl.col("label") != pl.col("label_right")).height == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perturbations"] == len(PERTS) and summary["skipped_perturbations"] == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def step_args(path, out, s: Derive):
    import argparse

    parser = argparse.ArgumentParser()
    step.add_arguments(parser)
    return parser.parse_args([
        "--h5ad", str(path), "--settings", s.params_json(), "--de", str(out / "mine-de.csv"),
        "--dir", str(out / "mine-dir.csv"), "--stats", str(out / "stats.parquet"), "--summary", str(out / "summary.json"),
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "changes", "expected"),
    [
        (None, {"perturbation_column": "guide"}, r"obs has no column 'guide' \(perturbation_column\)"),
        (None, {"replicate_column": "batch"}, r"obs has no column 'batch' \(replicate_column\)"),
        (None, {"layer": "raw"}, r"no layer 'raw' \(the raw counts\); its layers are \['counts'\]"),
        (None, {"control": "NTC"}, r"no control cells: no cell has perturbation == 'NTC'; most frequent values"),
        (None, {"layer": None}, r"X holds .* raw counts \(non-negative integers\) are needed"),
        (None, {"min_cells": 1000}, "no perturbation has at least min_cells = 1000 cells"),
        (None, {"min_mean_count": 1e6}, "no gene has a mean count per cell >= min_mean_count"),
    ],
)
def test_bad_screens_are_refused_before_any_work(tmp_path, edit, changes, expected):
    path = write_variant(tmp_path, lambda a: None)
    with pytest.raises(CommandError, match=expected):
        step.derive(path, settings(**changes))


def test_duplicate_genes_and_missing_file_are_refused(tmp_path):
    def duplicate(adata):
        adata.var_names = ["G000"] * 2 + list(adata.var_names[2:])

    with pytest.raises(CommandError, match=r"1 duplicate gene names in var: \['G000'\]"):
        step.derive(write_variant(tmp_path, duplicate), settings())
    with pytest.raises(CommandError, match="screen file not found"):
        step.derive(tmp_path / "absent.h5ad", settings())


def test_perturbations_with_too_few_cells_are_listed_skipped_and_counted(tmp_path, caplog):
    def thin(adata):
        keep = np.ones(adata.n_obs, dtype=bool)
        keep[np.flatnonzero(adata.obs["perturbation"] == PERTS[0])[5:]] = False  # P00 keeps 5 cells
        adata._inplace_subset_obs(keep)

    stats, summary = step.derive(write_variant(tmp_path, thin), settings(min_cells=20))
    assert summary["skipped"] == {PERTS[0]: 5} and summary["skipped_perturbations"] == 1
    assert PERTS[0] not in stats["pert"].to_list() and summary["perturbations"] == 3
    assert "P00 (5)" in caplog.text


def test_replicate_column_makes_the_pseudobulk_samples(tmp_path):
    def batches(adata):
        adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "b1", "b2")

    stats, _ = step.derive(write_variant(tmp_path, batches), settings(replicate_column="batch"))
    assert stats["pvalue"].null_count() < stats.height


def test_correction_and_split_helpers():
    p = np.array([0.01, 0.02, np.nan, 0.5])
    bh = adjust(p, "benjamini-hochberg")
    assert np.isnan(bh[2]) and np.allclose(bh[[0, 1, 3]], [0.03, 0.03, 0.5])
    assert (adjust(p, "benjamini-yekutieli")[[0, 1, 3]] >= bh[[0, 1, 3]]).all()
    split = split_perturbations([f"p{i}" for i in range(10)], 0.3, seed=4)
    assert sorted(split.values()).count("test") == 3
    assert split == split_perturbations([f"p{i}" for i in reversed(range(10))], 0.3, seed=4)


# --- configuration --------------------------------------------------------------------


def own_screen_config(**changes) -> dict:
    raw = yaml.safe_load((REPO / "config" / "own_screen.yaml").read_text())
    return cfg.complete(change(raw, **changes))


def test_own_screen_config_validates_and_fills_derive_defaults():
    config = own_screen_config()
    spec = config["data"]["derive"]["my_line"]
    assert spec["correction"] == "benjamini-hochberg" and spec["pseudo_replicates"] == 3
    assert cfg.fetched_cells(config) == ["k562"]
    s = step_settings("derive", config, cell="my_line")
    assert s.method == "deseq2" and "h5ad" not in s.params()  # the file is the rule's input
    assert step_settings("derive", own_screen_config(**{"data.derive.my_line.fdr": 0.1}), cell="my_line") != s


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data.derive.other": {"h5ad": "x.h5ad", "control": "NTC"}}, r"data.derive: \['other'\] not in data.cells"),
        ({"data.source": None}, r"data.source: none given, yet cell lines \['k562'\]"),
        ({"data.sha256": {}}, r"no pinned checksum for \['k562-de.csv', 'k562-dir.csv'\]"),
        ({"data.cells": ["k562", "My-Line"]}, "My-Line"),
        ({"data.derive.my_line.method": "t-test"}, "t-test"),
    ],
)
def test_bad_derive_config_is_refused(changes, expected):
    with pytest.raises(ConfigError, match=expected):
        own_screen_config(**changes)


def test_a_derived_cell_needs_no_source_nor_checksum():
    config = own_screen_config(**{"data.cells": ["my_line"], "data.holdout": [], "data.source": None, "data.sha256": {}})
    assert cfg.fetched_cells(config) == []


# --- the workflow ---------------------------------------------------------------------


@pytest.mark.slow
def test_own_screen_config_runs_from_the_screen_to_the_tables(tmp_path):
    """config/own_screen.yaml, as a user runs it: make the screen, then the tables."""
    shutil.copytree(REPO / "data" / "perturbqa-demo", tmp_path / "data" / "perturbqa-demo")
    made = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_own_screen.py"), "--out", str(tmp_path / "data" / "own-screen" / "my_line.h5ad")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    tables = [f"results/table{n}.csv" for n in (1, 2, 3, 4, 5)]
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "own_screen.yaml"), "--cores", "2", *tables],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    table5 = pl.read_csv(tmp_path / "results" / "table5.csv")
    assert table5.columns == ["task", "K562", "my_line", "Total"]
    summary = json.loads((tmp_path / "results" / "derived" / "my_line" / "summary.json").read_text())
    assert summary["de"] > 0 and summary["perturbations"] == 24
    table4 = pl.read_csv(tmp_path / "results" / "table4.csv").filter(pl.col("kind") == "computed")
    assert table4["split"].unique().to_list() == ["my_line_holdout"]
    assert table4["row"].to_list() == ["majority", "transfer", "gene_prior", "knn"]
    table1 = pl.read_csv(tmp_path / "results" / "table1.csv").filter(pl.col("kind") == "computed")
    assert table1["my_line_n"].min() > 0 and table1["K562_n"].min() > 0

    def planned(config: Path) -> str:
        dry = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
             "--configfile", str(config), "--cores", "2", "-n", *tables],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr[-2000:]
        return dry.stdout

    assert "Nothing to be done" in planned(REPO / "config" / "own_screen.yaml")
    stricter = yaml.safe_load((REPO / "config" / "own_screen.yaml").read_text())
    stricter["data"]["derive"]["my_line"]["fdr"] = 0.01
    (tmp_path / "stricter.yaml").write_text(yaml.safe_dump(stricter))
    assert "rule derive:" in planned(tmp_path / "stricter.yaml").replace("localrule", "rule")
