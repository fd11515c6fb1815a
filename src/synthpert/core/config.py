"""Checks of the configuration that a JSON schema cannot express (cross-references),
run by the Snakefile right after schema validation, before any job starts."""

from __future__ import annotations

from pathlib import Path

import yaml

from synthpert.core.prompts import GRADES
from synthpert.core.rows import LLM_ROWS, RL_ROWS, ROWS, TRAINED_ROWS, row_model_name
from synthpert.core.settings import LOCAL_BACKENDS
from synthpert.errors import ConfigError

SCHEMA = Path(__file__).resolve().parent / "schema.yaml"  # package data: works installed too


def complete(config: dict) -> dict:
    """`config` validated against the schema, with its defaults filled in exactly as the
    Snakefile does, then cross-checked (`check`). Raises ConfigError."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA))
    except WorkflowError as err:
        raise ConfigError(str(err)) from None
    check(config)
    return config


def model_defaults() -> dict:
    """The schema's defaults of a `models:` entry, its `engine:` settings included."""
    properties = yaml.safe_load(SCHEMA.read_text())["$defs"]["model"]["properties"]
    defaults = {key: value["default"] for key, value in properties.items() if "default" in value}
    defaults["engine"] = {key: value["default"] for key, value in properties["engine"]["properties"].items()}
    return defaults


def model_entry(entry: dict) -> dict:
    """A `models:` entry written outside a configuration (a tool's, a benchmark's, a test's)
    completed with the schema's defaults as validation completes one in a configuration."""
    defaults = model_defaults()
    return {**defaults, **entry, "engine": {**defaults["engine"], **(entry.get("engine") or {})}}


def load(path: str | Path) -> dict:
    """A configuration file, completed (`complete`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration {path} not found")
    return complete(yaml.safe_load(path.read_text()) or {})


def check(config: dict) -> None:
    data = config["data"]
    stray = [c for c in data["derive"] if c not in data["cells"]]
    if stray:
        raise ConfigError(f"data.derive: {stray} not in data.cells {data['cells']}")
    fetched = fetched_cells(config)
    if fetched and not data["source"]:
        raise ConfigError(
            f"data.source: none given, yet cell lines {fetched} are not in data.derive; "
            "name the folder or URL holding their <cell>-de.csv and <cell>-dir.csv"
        )
    missing = [f"{cell}-{kind}.csv" for cell in fetched for kind in ("de", "dir") if f"{cell}-{kind}.csv" not in data["sha256"]]
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
    if student["backend"] not in LOCAL_BACKENDS:
        raise ConfigError(
            f"train.model: the student must run in process (backend {' or '.join(LOCAL_BACKENDS)}), "
            f"not {student['backend']!r}"
        )
    for key, values, known in (
        ("train.variants", config["train"]["variants"], TRAINED_ROWS),
        ("evaluate.rows", config["evaluate"]["rows"], ROWS),
        ("critic.keep_grades", config["critic"]["keep_grades"], GRADES),
    ):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ConfigError(f"{key}: {unknown} unknown; expected some of {list(known)}")
    untrained = [r for r in config["evaluate"]["rows"] if r in TRAINED_ROWS and r not in config["train"]["variants"]]
    if untrained:
        raise ConfigError(f"evaluate.rows: {untrained} are not trained; add them to train.variants")
    rows = config["evaluate"]["rows"]
    unstarted = [r for r in rows if r in RL_ROWS and RL_ROWS[r] not in config["train"]["variants"]]
    if unstarted:
        raise ConfigError(
            f"evaluate.rows: {unstarted} continue an SFT adapter by GRPO; add "
            f"{sorted({RL_ROWS[r] for r in unstarted})} to train.variants"
        )
    rl = config["rl"]
    if rl["batch_size"] % rl["num_generations"]:
        raise ConfigError(
            f"rl.batch_size {rl['batch_size']} must be a multiple of rl.num_generations {rl['num_generations']} "
            "(each step holds whole groups of completions)"
        )
    check_budgets(config)


def fetched_cells(config: dict) -> list[str]:
    """The cell lines whose CSV pairs are fetched from `data.source` (the others are
    derived from their own screen, `data.derive`)."""
    return [c for c in config["data"]["cells"] if c not in config["data"]["derive"]]


def paying_models(config: dict, step: str) -> list[str]:
    """The `models:` names an API step pays for: traces and critic their model, evaluate
    its API rows (a local model costs GPU time, not money)."""
    if step == "evaluate":
        names = [row_model_name(r, config) for r in config["evaluate"]["rows"] if r in LLM_ROWS]
    else:
        names = [config[step]["model"]]
    return sorted({n for n in names if config["models"][n]["backend"] == "openai"})


def check_budgets(config: dict) -> None:
    """A budget can only be kept for models with a price."""
    overall = config.get("budget", {}).get("usd") is not None
    for step in ("traces", "critic", "evaluate"):
        if config[step].get("budget_usd") is None and not overall:
            continue
        unpriced = [n for n in paying_models(config, step) if config["models"][n].get("price") is None]
        if unpriced:
            which = f"{step}.budget_usd" if config[step].get("budget_usd") is not None else "budget.usd"
            raise ConfigError(
                f"{which} is set, but model(s) {unpriced} used by {step} have no price; add "
                f"models.<name>.price {{input, output, date, source}} (USD per million tokens)"
            )
