"""The locks (locks/*.txt and the conda files envs/*.yaml, which are locks too; `make lock`,
scripts/lock.py): current with pyproject.toml and locks/sources.toml, resolvable today for
their platform, the versions the CPU and cluster locks share equal or listed as known
differences, and this environment installed from the CPU lock."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lock_script", REPO / "scripts" / "lock.py")
lock = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
spec.loader.exec_module(lock)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of what the locks depend on, to change."""
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for folder in ("locks", "envs", "containers"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def test_every_lock_and_conda_file_is_current():
    assert lock.check(REPO) == []


def test_a_floor_moved_without_a_new_lock_fails_the_check(checkout):
    pyproject = checkout / "pyproject.toml"
    text = pyproject.read_text()
    assert '"transformers>=5.0"' in text
    pyproject.write_text(text.replace('"transformers>=5.0"', '"transformers>=5.1"'))
    problems = lock.check(checkout)
    stale = {p.split()[0] for p in problems}
    # transformers is in the CPU locks and in llm and train; data does not install it
    assert {"locks/cpu-dev.txt", "locks/cpu-demo.txt", "locks/login.linux-64.txt", "envs/llm.yaml", "envs/train.yaml"} <= stale
    assert "envs/data.yaml" not in stale
    assert all("run `make lock`" in p for p in problems)


def test_the_apptainer_image_follows_the_conda_files(checkout):
    """containers/synthpert.def puts each environment where Snakemake looks for it: at the md5
    of its conda file (the same prefixes as `snakemake --containerize` printed)."""
    definition = (REPO / "containers" / "synthpert.def").read_text()
    for env in ("data", "derive", "evaluate", "llm", "train"):
        md5 = hashlib.md5((REPO / "envs" / f"{env}.yaml").read_bytes()).hexdigest()
        assert f"envs/{env}.yaml /conda-envs/{md5}/environment.yaml" in definition
    path = checkout / "envs" / "data.yaml"
    path.write_text(path.read_text() + "# a change\n")
    assert lock.check(checkout) == ["containers/synthpert.def does not match envs/*.yaml: run `make lock`"]


def test_a_shared_version_that_differs_must_be_listed(checkout):
    sources = checkout / "locks" / "sources.toml"
    text = sources.read_text()
    line = next(x for x in text.splitlines() if x.startswith('"train/transformers" = '))
    sources.write_text(text.replace(line + "\n", ""))
    assert lock.check(checkout) == ["train/transformers: 5.17.0 on the cluster, 5.19.0 in cpu-dev"]
    sources.write_text(text.replace(line, line + '\n"llm/polars" = "not so"'))
    assert lock.check(checkout) == ["llm/polars: listed in known_differences but the versions agree (or one lock lacks it)"]


def test_the_cluster_pairs_its_tools_as_they_support():
    """vLLM pins its torch (from PyPI, no second build from conda) and TRL's vLLM is one TRL supports."""
    llm, train = (lock.pins((REPO / "envs" / f"{e}.yaml").read_text()) for e in ("llm", "train"))
    for env in (llm, train):
        assert "+" not in env["torch"], "the cluster's torch is PyPI's CUDA build"
    assert llm["vllm"] == "0.32.0" and llm["torch"] == "2.13.0"
    assert train["trl"] == "1.16.0" and train["vllm"] == "0.31.0"  # TRL 1.16 supports vLLM 0.22 to 0.31


def test_every_lock_resolves_for_its_platform(tmp_path):
    """Resolve every lock again with uv (PyPI, releases up to sources.toml's exclude_newer):
    the same text as committed."""
    lock.write(REPO, tmp_path)
    assert lock.compare(REPO, tmp_path) == []


def test_this_environment_is_installed_from_the_cpu_lock():
    """`make test` installs locks/cpu-dev.txt: every package at its locked version, nothing
    but the project itself and pip's own tools besides, and none of the left-out CUDA builds."""
    locked = lock.pins((REPO / "locks" / "cpu-dev.txt").read_text())
    # the venv's own site-packages, not sys.path: what other tests put on the path (a folder
    # they work in, as the current directory) is not what `make test` installed
    venv = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=venv)}
    wrong = {name: (version, installed.get(name)) for name, version in locked.items() if installed.get(name) != version}
    assert not wrong, f"(locked, installed): {wrong}"
    extra = set(installed) - set(locked) - {"synthpert", "pip", "setuptools", "wheel"}
    assert not extra, f"installed but not in locks/cpu-dev.txt: {sorted(extra)}"
    assert not set(installed) & {"torchvision", "torchaudio", "torchcodec"}
