"""Shared fixtures. The embedded model is converted once per machine into the user's
cache (`synthpert.llm.embedded.cache_dir`, shared with the demo) and reused by every test;
no test reads or writes the checkout's results/, logs/, resources/ or .snakemake/."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_PERTURBQA = REPO.parent / "shared" / "perturbqa"


WORKFLOW_STATE = ("results", "logs", "resources", ".snakemake")


def workflow_state() -> dict[str, tuple[int, int]]:
    """Every file of the checkout's workflow folders with its size and modification time."""
    state = {}
    for name in WORKFLOW_STATE:
        for path in (REPO / name).rglob("*"):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                state[str(path.relative_to(REPO))] = (stat.st_size, stat.st_mtime_ns)
    return state


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """The suite passes the same in a clean checkout and after `make demo`: no test reads
    or writes the checkout's results/, logs/, resources/ or .snakemake/ (checked at the end)."""
    before = workflow_state()
    yield
    after = workflow_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests changed the checkout's workflow state: {changed[:20]}"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from synthpert.llm.embedded import cached_embedded_model

    return cached_embedded_model()


@pytest.fixture(scope="session")
def shared_perturbqa() -> Path:
    if not (SHARED_PERTURBQA / "SHA256SUMS").exists():
        pytest.fail(f"the PerturbQA mirror is expected at {SHARED_PERTURBQA}")
    return SHARED_PERTURBQA
