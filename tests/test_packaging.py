"""The package works installed, not only from its source checkout: a wheel built from the
repository, in a fresh virtual environment outside the checkout, finds its schema and
answers its commands."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a new venv holding the wheel; the dependencies come from this environment
    (a path line, so this environment's editable install of synthpert is not seen)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("synthpert-*.whl")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "venv" / "bin"


def run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([bin_dir / "synthpert", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_installed_wheel_validates_a_config_and_answers_help(installed, tmp_path):
    where = subprocess.run([installed / "python", "-c", "import synthpert; print(synthpert.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert str(installed.parent) in where.stdout, where.stdout + where.stderr  # the wheel, not the checkout
    ok = run(installed, "validate", str(REPO / "config" / "demo.yaml"), cwd=tmp_path)
    assert ok.returncode == 0 and "valid; cell lines k562, rpe1, hepg2, jurkat" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "config" / "demo.yaml").read_text().replace("learning_rate: 5.0e-4", "learning_rat: 1"))
    refused = run(installed, "validate", str(bad), cwd=tmp_path)
    assert refused.returncode == 1 and "learning_rat" in refused.stderr
    helped = run(installed, "ask", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--model" in helped.stdout
