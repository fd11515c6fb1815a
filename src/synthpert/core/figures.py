"""Report figures written like every other output: atomically."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from synthpert.core.io import atomic_path


def save_figure(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
