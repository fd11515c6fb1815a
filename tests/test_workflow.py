"""The workflow itself: config validation, dry runs, and table 5 through Snakemake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True, timeout=timeout
    )


def write_config(path: Path, base: str = "config.yaml", **changes) -> Path:
    cfg = yaml.safe_load((REPO / "config" / base).read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/demo.yaml", None])
def test_dry_run_from_repo_root(configfile, tmp_path):
    """The README's commands from the repository root (the demo when no config is given),
    planned in a fresh working directory so that the checkout's own results never matter."""
    args = ["-n", "--directory", str(tmp_path)] + (["--configfile", configfile] if configfile else [])
    result = subprocess.run([*SNAKEMAKE, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule train:" in result.stdout + result.stderr


def test_table5_through_snakemake_equals_paper(tmp_path, shared_perturbqa):
    config = write_config(tmp_path / "paper_local.yaml", **{"data.source": str(shared_perturbqa)})
    result = snakemake(tmp_path, "--cores", "2", "results/table5.csv", "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pl.read_csv(tmp_path / "results" / "table5.csv")
    assert table.to_dicts() == [
        {"task": "Direction of change", "K562": 19980, "RPE1": 26652, "HepG2": 17860, "Jurkat": 20058, "Total": 84550},
        {"task": "Differential expression", "K562": 157679, "RPE1": 187089, "HepG2": 126889, "Jurkat": 142822,
         "Total": 614479},
    ]


def test_corrupt_download_stops_the_run_and_leaves_nothing(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    for f in (REPO / "data" / "perturbqa-demo").glob("*.csv"):
        (src / f.name).write_bytes(f.read_bytes())
    (src / "jurkat-dir.csv").write_bytes((src / "jurkat-dir.csv").read_bytes()[:-40])  # truncated
    config = write_config(tmp_path / "c.yaml", base="demo.yaml", **{"data.source": str(src)})
    result = snakemake(tmp_path, "--cores", "1", "--keep-going", "results/table5.csv", "--configfile", str(config))
    assert result.returncode != 0
    log = (tmp_path / "logs" / "fetch" / "jurkat-dir.csv.log").read_text()
    assert "jurkat-dir.csv: checksum mismatch" in log and "expected sha256 f96a85f9" in log
    assert not (tmp_path / "resources" / "perturbqa" / "jurkat-dir.csv").exists()
    assert not (tmp_path / "results" / "table5.csv").exists()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"traces.shard_count": 3}, "shard_count"),
        ({"data.cells": ["k562", "hela"]}, "hela"),
        ({"train.batch_size": "four"}, "four"),
        ({"critic.keep_grades": ["superb"]}, "superb"),
        ({"traces.model": "gpt-9"}, "traces.model: 'gpt-9' is not a model"),
        ({"data.holdout": ["jurkat"], "data.cells": ["k562", "rpe1"]}, "data.holdout"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, changes, expected):
    config = write_config(tmp_path / "bad.yaml", base="demo.yaml", **changes)
    result = snakemake(tmp_path, "--cores", "1", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_cell_eval_adds_score_screens_with_the_derived_statistics(tmp_path):
    """`evaluate.cell_eval: true` puts results/screen_scores.csv in `all`; a derived cell
    line's real side is its stats.parquet (config/own_screen.yaml derives my_line)."""
    config = write_config(tmp_path / "c.yaml", "own_screen.yaml", **{"evaluate.cell_eval": True})
    h5ad = tmp_path / "run" / "data" / "own-screen" / "my_line.h5ad"  # planned, never read
    h5ad.parent.mkdir(parents=True)
    h5ad.touch()
    result = subprocess.run(
        [*SNAKEMAKE, "-n", "-p", "--directory", str(tmp_path / "run"), "--configfile", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "rule score_screens:" in out
    assert "--stats my_line=results/derived/my_line/stats.parquet" in out
