"""Shared fixtures. The embedded model is converted once per machine into
resources/models/ (the same folder the demo uses) and reused by every test."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_PERTURBQA = REPO.parent / "shared" / "perturbqa"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from synthpert.embedded import ensure_embedded_model

    return ensure_embedded_model(REPO / "resources" / "models" / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_perturbqa() -> Path:
    if not (SHARED_PERTURBQA / "SHA256SUMS").exists():
        pytest.fail(f"the PerturbQA mirror is expected at {SHARED_PERTURBQA}")
    return SHARED_PERTURBQA
