"""The README's demo targets, as `make -n` prints them: each Snakemake run builds its DAG
with its configuration (every rule the demo promises), and each report is written into the
folder that run fills. (A report pointed at the other demo's folder once failed `make demo`
after a complete run.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO

EXPECTED_RULES = {
    "demo": {"traces", "critic_select", "train", "grpo", "predict", "auroc_table", "class_table"},
    "demo-evidence": {"evidence_table", "evidence_traces", "traces_evidence", "critic_grade_evidence",
                      "critic_select_evidence", "train", "grpo", "predict_evidence", "class_table"},
}  # fmt: skip


def snakemake_lines(target: str) -> list[list[str]]:
    """The Snakemake commands of `make -n target`, without the PATH prefix."""
    printed = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout
    commands = [shlex.split(line) for line in printed.splitlines() if " snakemake " in f" {line} "]
    return [c[c.index("snakemake") + 1 :] for c in commands]


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("target", sorted(EXPECTED_RULES))
def test_each_demo_builds_its_dag_and_reports_into_its_own_folder(target, tmp_path):
    runs = [a for a in snakemake_lines(target) if "--report" not in a]
    reports = [a for a in snakemake_lines(target) if "--report" in a]
    assert len(runs) == len(reports) == 1
    (run,), (report,) = runs, reports
    folder = option(run, "--directory") or "."
    assert option(report, "--directory") == option(run, "--directory")
    report_path = option(report, "--report").replace(str(REPO) + "/", "")
    assert report_path == ("results/report.html" if folder == "." else f"{folder}/results/report.html")
    args = [a for a in run if a not in ("--rerun-incomplete",)]
    if "--directory" in args:
        args[args.index("--directory") + 1] = str(tmp_path)
    else:
        args += ["--directory", str(tmp_path)]
    dry = subprocess.run([sys.executable, "-m", "snakemake", *args, "-n", "--quiet", "rules"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    log = dry.stdout + dry.stderr
    assert dry.returncode == 0, log[-3000:]
    listed = set(re.findall(r"^(\w+)\s+\d+$", log, flags=re.MULTILINE))
    assert EXPECTED_RULES[target] <= listed, (EXPECTED_RULES[target] - listed, log[-2000:])
