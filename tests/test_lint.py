"""The workflow's own checks: `snakefmt --check` and `snakemake --lint` report nothing, the
paper configuration's DAG can be drawn, and docs/dag.svg shows the current rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEFILES = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
PAPER = str(REPO / "config" / "config.yaml")


def snakemake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "--directory", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_snakefmt_check():
    done = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "--diff", *map(str, SNAKEFILES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.mark.parametrize("configfile", ["demo.yaml", "config.yaml"])
def test_snakemake_lint_reports_nothing(tmp_path, configfile):
    done = snakemake(tmp_path, "--lint", "--configfile", str(REPO / "config" / configfile))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Congratulations" in done.stdout + done.stderr


def rulegraph_rules(dot: str) -> set[str]:
    return set(re.findall(r'label = "(\w+)"', dot))


def test_paper_dag_and_rulegraph(tmp_path):
    dag = snakemake(tmp_path, "--dag", "--configfile", PAPER)
    assert dag.returncode == 0, dag.stderr[-3000:]
    assert dag.stdout.lstrip().startswith("digraph") and dag.stdout.count("label =") > 100
    graph = snakemake(tmp_path, "--rulegraph", "--configfile", PAPER)
    assert graph.returncode == 0, graph.stderr[-3000:]
    rules = rulegraph_rules(graph.stdout)
    assert {"fetch", "prepare", "traces", "critic_grade", "train", "predict", "auroc_table", "all"} <= rules


def test_docs_dag_svg_shows_the_current_rules(tmp_path):
    """docs/dag.svg is `snakemake --rulegraph` of the paper configuration through dot."""
    graph = snakemake(tmp_path, "--rulegraph", "--configfile", PAPER)
    assert graph.returncode == 0, graph.stderr[-3000:]
    svg = (REPO / "docs" / "dag.svg").read_text()
    drawn = set(re.findall(r"<text[^>]*>(\w+)</text>", svg))
    assert drawn == rulegraph_rules(graph.stdout), "re-render docs/dag.svg (see docs/cluster.md)"
