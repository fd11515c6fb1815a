"""Checks of the configuration that a JSON schema cannot express (cross-references),
run by the Snakefile right after schema validation, before any job starts."""

from __future__ import annotations

from pathlib import Path

import yaml

from synthpert.data import split_names
from synthpert.errors import ConfigError
from synthpert.rows import TRAINED_ROWS



SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def complete(config: dict) -> dict:
    """`config` validated against the schema, with its defaults filled in exactly as the
    Snakefile does, then cross-checked (`check`). Raises ConfigError."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    if not SCHEMA.is_file():
        raise ConfigError(f"the configuration schema {SCHEMA} is missing; run synthpert from its source checkout")
    try:
        validate(config, str(SCHEMA))
    except WorkflowError as err:
        raise ConfigError(str(err)) from None
    check(config)
    return config


def load(path: str | Path) -> dict:
    """A configuration file, completed (`complete`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration {path} not found")
    return complete(yaml.safe_load(path.read_text()) or {})


def check(config: dict) -> None:
    data = config["data"]
    missing = [
        f"{cell}-{kind}.csv"
        for cell in data["cells"]
        for kind in ("de", "dir")
        if f"{cell}-{kind}.csv" not in data["sha256"]
    ]
    if missing:
        raise ConfigError(f"data.sha256: no pinned checksum for {missing}")
    stray = [c for c in data["holdout"] if c not in data["cells"]]
    if stray:
        raise ConfigError(f"data.holdout: {stray} not in data.cells {data['cells']}")
    models = config["models"]
    for key in ("traces", "critic", "train"):
        name = config[key]["model"]
        if name not in models:
            raise ConfigError(f"{key}.model: {name!r} is not a model in models {sorted(models)}")
    student = models[config["train"]["model"]]
    if student["backend"] != "local":
        raise ConfigError(f"train.model: the student must use the local backend, not {student['backend']!r}")
    untrained = [r for r in config["evaluate"]["rows"] if r in TRAINED_ROWS and r not in config["train"]["variants"]]
    if untrained:
        raise ConfigError(f"evaluate.rows: {untrained} are not trained; add them to train.variants")


def splits(config: dict) -> list[str]:
    return split_names(config["data"]["holdout"])


def test_cells(config: dict, split: str) -> list[str]:
    """Cell lines whose rows are asked in a split's test set."""
    return config["data"]["cells"] if split == "default" else [split.removesuffix("_holdout")]


def train_cells(config: dict, split: str) -> list[str]:
    """Cell lines with training rows in a split (trace generation is sharded over them)."""
    if split == "default":
        return config["data"]["cells"]
    return [c for c in config["data"]["cells"] if c != split.removesuffix("_holdout")]
