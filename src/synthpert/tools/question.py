"""What `synthpert ask` and `synthpert screen` share: the names of a question resolved and
checked before any model is loaded, and the model asked the evaluation's question.

* `--model` is a name in the configuration's `models:`, a model row of the tables
  (`base`, `teacher`, or a trained row such as `synthpert`, whose adapter is
  `results/models/{split}/{row}/adapter`), or the path of a PEFT adapter folder (its
  `adapter_config.json` names the base model; a configured local model with that base
  lends its settings, else the schema's defaults apply). `core.rows.model_of` is the
  rule for names and rows, here as in the screen rule's inputs and settings.
* Names are checked against the PerturbQA table of the split: an unknown cell line, gene
  or perturbation stops with the closest known names (a typo should not cost a model
  run); `--allow-unknown` answers about genes or perturbations PerturbQA lacks. A
  perturbation (or cell line) with no training row in the split is allowed and flagged:
  the model has never been taught about it.
* The question is asked the way `synthpert predict` asks it
  (`evaluation.answers.question_request`), and answers are cached in a request log.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from synthpert.core.arguments import settings_type
from synthpert.core.config import load as config_load
from synthpert.core.config import model_entry
from synthpert.core.labels import display_cell
from synthpert.core.paths import adapter_dir, adapter_layout, split_table
from synthpert.core.prompts import parse_reasoning
from synthpert.core.rows import LLM_ROWS, model_of
from synthpert.core.settings import LOCAL_BACKENDS, Generation, Model, Screen
from synthpert.errors import CommandError, ConfigError
from synthpert.evaluation.answers import (
    PREDICTION_SCHEMA,
    answer_records,
    qid_expr,
    question_request,
    refuse_failures,
)
from synthpert.llm.backends import make_backend
from synthpert.llm.embedded import local_path
from synthpert.llm.requests import RequestLog, run_requests

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("config/demo.yaml")


# --------------------------------------------------------------------------- settings


def load_config(path: str | Path) -> dict:
    """A configuration file, validated and completed with the schema's defaults exactly
    as the Snakefile does, then cross-checked."""
    try:
        return config_load(path)
    except ConfigError as err:
        raise CommandError(f"configuration {path} is invalid: {err}") from None


def generation_settings(config: dict, max_new_tokens: int | None) -> Generation:
    """`evaluate.generation` (what the model was evaluated with), optionally shortened."""
    generation = Generation.of(config["evaluate"]["generation"])
    if max_new_tokens is not None:
        generation = dataclasses.replace(generation, max_new_tokens=max_new_tokens)
    return generation


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Asked:
    """A model to ask: its `models:` settings and, for a fine-tuned student, its adapter."""

    name: str  # the --model name, or the variant folder of an adapter path
    model: Model
    adapter: str | None = None
    split: str | None = None  # the split an adapter path was trained on, when its layout says

    def describe(self) -> str:
        base = f"{self.model.backend} {self.model.model}"
        return f"{self.name} ({base} + adapter {self.adapter})" if self.adapter else f"{self.name} ({base})"


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def adapter_model(path: Path, settings: dict) -> Asked:
    """A PEFT adapter folder: its base model with the settings of the configured local
    model that has this base (the student first), else the schema's defaults."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise CommandError(f"folder {path} is not a PEFT adapter (no adapter_config.json)")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise CommandError(f"{config_file} does not name its base model (base_model_name_or_path)")
    models = settings["models"]
    names = [settings["train"]["model"], *sorted(models)]
    local = [models[n] for n in names if n in models and models[n]["backend"] in LOCAL_BACKENDS]
    spec = next((s for s in local if _same_model(local_path(s["model"]), base)), None)
    model = Model.of(spec if spec is not None else model_entry({"backend": "local", "model": base}))
    layout = adapter_layout(path)  # the workflow's layout names the variant and its split
    if layout is not None:
        split, row = layout
        return Asked(row, model, str(path), split)
    return Asked(path.resolve().name, model, str(path))


def trained_adapter(name: str, split: str, results: Path) -> str:
    """The adapter of a trained row (`results/models/{split}/{row}/adapter`), which must exist."""
    adapter = adapter_dir(split, name, results)
    if not (adapter / "adapter_config.json").is_file():
        raise CommandError(
            f"model {name!r} is a fine-tuned student, but split {split!r} has no trained adapter "
            f"at {adapter}; train it first (snakemake {adapter}) or pass --split / an adapter folder"
        )
    return str(adapter)


def rule_model(name: str, settings: Screen, split: str, results: Path) -> Asked:
    """The model of a screen rule: the resolved `models:` entry, with its adapter when it is a trained row."""
    return Asked(name, settings.model, trained_adapter(name, split, results) if settings.trained else None)


def resolve_model(name: str, settings: dict, split: str, results: Path) -> Asked:
    """`--model`: an adapter folder, a `models:` name, or a model row (see module docstring)."""
    if Path(name).is_dir():
        return adapter_model(Path(name), settings)
    try:
        entry, trained = model_of(name, settings)
    except ConfigError:
        known = sorted({*settings["models"], *LLM_ROWS})
        raise CommandError(
            f"unknown model {name!r}: not an adapter folder, nor a model of the configuration or a model row "
            f"({', '.join(known)}){suggest(name, known)}"
        ) from None
    return Asked(name, Model.of(settings["models"][entry]), trained_adapter(name, split, results) if trained else None)


# --------------------------------------------------------------------------- names


def suggest(name: str, known, n: int = 3) -> str:
    """'; closest known: A, B' from difflib (case-insensitive), or '' when nothing is close."""
    by_upper = {k.upper(): k for k in known}
    close = difflib.get_close_matches(name.upper(), list(by_upper), n=n, cutoff=0.6)
    return f"; closest known: {', '.join(by_upper[c] for c in close)}" if close else ""


def read_split(results: Path, split: str) -> pl.DataFrame:
    """Every PerturbQA tuple with its role (train/test) in the split."""
    path = split_table(split, results)
    if not path.is_file():
        raise CommandError(f"split {split!r} not found at {path}; run the data step first (snakemake {path})")
    return pl.read_parquet(path)


def resolve_cell(name: str, table: pl.DataFrame) -> str:
    """The cell id (`k562`) of a cell line given in any case (`K562`)."""
    cells = sorted(table["cell"].unique().to_list())
    cell = name.lower()
    if cell not in cells:
        names = [display_cell(c) for c in cells]
        raise CommandError(f"unknown cell line {name!r}; known: {', '.join(names)}{suggest(name, names)}")
    return cell


def resolve_names(kind: str, names: list[str], known: list[str], allow_unknown: bool, where: str) -> list[str]:
    """Known spellings of `names` (matched case-insensitively); unknown ones stop with the
    closest known names, or pass with a warning under `allow_unknown`."""
    by_upper = {k.upper(): k for k in known}
    out, unknown = [], []
    for name in names:
        canonical = by_upper.get(name.upper())
        if canonical is None:
            unknown.append(name)
        out.append(canonical or name)
    if unknown and not allow_unknown:
        lines = [f"  {name}{suggest(name, known) or '; no similar name'}" for name in unknown[:20]]
        more = f"\n  ... and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        message = f"{len(unknown)} unknown {kind}(s), not {where}:\n" + "\n".join(lines) + more
        raise CommandError(message + "\n(pass --allow-unknown to ask about them anyway)")
    if unknown:
        log.warning("%d %s(s) not %s, asked anyway: %s", len(unknown), kind, where, ", ".join(unknown[:20]))
    return out


def resolve_pert(name: str, table: pl.DataFrame, allow_unknown: bool) -> str:
    known = table["pert"].unique().sort().to_list()
    return resolve_names("perturbation", [name], known, allow_unknown, "perturbed in PerturbQA")[0]


def resolve_genes(names: list[str], table: pl.DataFrame, cell: str, allow_unknown: bool) -> list[str]:
    return resolve_names(
        "gene", names, measured_genes(table, cell), allow_unknown, f"measured in {display_cell(cell)}"
    )


def measured_genes(table: pl.DataFrame, cell: str) -> list[str]:
    """Every gene PerturbQA measured in a cell line (`screen --all-measured`)."""
    return table.filter(pl.col("cell") == cell)["gene"].unique().sort().to_list()


def seen_in_training(table: pl.DataFrame, column: str, value: str) -> bool:
    """Whether a perturbation (`pert`) or cell line (`cell`) has a training row in the split."""
    return table.filter((pl.col("role") == "train") & (pl.col(column) == value)).height > 0


def training_notes(table: pl.DataFrame, cell: str, pert: str, split: str) -> list[str]:
    """Warnings for a perturbation (or cell line) that no training row of the split has."""
    notes = []
    if not seen_in_training(table, "pert", pert):
        notes.append(f"{pert} is never perturbed in the training rows of split {split!r}: an unseen perturbation")
    if not seen_in_training(table, "cell", cell):
        notes.append(f"{display_cell(cell)} has no training rows in split {split!r}: an unseen cell line")
    return notes


def question_rows(table: pl.DataFrame, cell: str, pert: str, genes: list[str]) -> pl.DataFrame:
    """One question per gene (`qid, cell, pert, gene`) with PerturbQA's measurement where it
    exists (`label`, `role` in the split), else nulls."""
    asked = pl.DataFrame({"gene": genes}, schema={"gene": pl.String}).unique(maintain_order=True)
    measured = table.filter((pl.col("cell") == cell) & (pl.col("pert") == pert)).select("gene", "label", "role")
    return (
        asked.join(measured, on="gene", how="left", maintain_order="left")
        .with_columns(cell=pl.lit(cell), pert=pl.lit(pert))
        .with_columns(qid_expr().alias("qid"))
        .select("qid", "cell", "pert", "gene", pl.col("label").cast(pl.Int8), "role")
    )


# --------------------------------------------------------------------------- asking


def answer(rows: pl.DataFrame, model: Asked, generation: Generation, log_path: Path, desc: str) -> pl.DataFrame:
    """The model's three-class answer to every question (`PREDICTION_SCHEMA` columns, task
    `de3`); answers already in `log_path` are reused, new ones appended to it."""
    backend = make_backend(model.model, adapter=model.adapter)
    local = model.model.local
    requests = [question_request(q, "de3", generation, local) for q in rows.iter_rows(named=True)]
    with RequestLog(log_path) as request_log:
        responses = run_requests(backend, requests, request_log, None, desc)
    refuse_failures(responses, desc, log_path)  # a failure is never an answer
    return pl.DataFrame(answer_records(rows, requests, responses), schema=PREDICTION_SCHEMA)


def reasoning_text(raw_text: str, finish_reason: str) -> str:
    """The reasoning of an answer, marked when generation stopped at max_new_tokens."""
    reasoning = parse_reasoning(raw_text)
    if reasoning is None:  # no </think>: everything before the answer tag
        reasoning = raw_text.split("<answer>")[0].replace("<think>", "").strip()
    if finish_reason == "length":
        reasoning += " [... cut off at max_new_tokens]"
    return reasoning


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments `ask` and `screen` share."""
    parser.add_argument(
        "--model",
        required=True,
        help="a model of the configuration (student, teacher ...), a model row (base, synthpert, sft_data ...; "
        "trained rows use RESULTS/models/SPLIT/ROW/adapter) or a PEFT adapter folder",
    )
    parser.add_argument("--cell", required=True, help="cell line of the split (K562, RPE1, HepG2, Jurkat, or your own)")
    parser.add_argument("--pert", required=True, help="the knocked-down gene")
    parser.add_argument(
        "--split", default=None, help="split the model was trained on (default: from an adapter path, else 'default')"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="configuration file (default: %(default)s)")
    source.add_argument(
        "--settings", type=settings_type, default=None, help="JSON: the screen step's settings (what rules pass)"
    )
    parser.add_argument("--run", type=settings_type, default={}, help="JSON: how the step runs (what rules pass)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="reasoning budget (default: evaluate.generation's)"
    )
    parser.add_argument(
        "--allow-unknown", action="store_true", help="ask about genes or perturbations that PerturbQA does not have"
    )


@dataclass(frozen=True)
class Setup:
    """A checked question: its names, model, generation settings, data and notes."""

    cell: str
    pert: str
    split: str
    model: Model
    generation: Generation
    table: pl.DataFrame
    notes: list[str]


def setup(args: argparse.Namespace) -> Setup:
    """Everything `ask` and `screen` check before loading a model."""
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.settings is not None:  # a rule: the model is resolved already
        settings = Screen.from_cli(args.settings, args.run)
        model, generation = rule_model(args.model, settings, args.split or "default", args.results), settings.generation
    else:
        config = load_config(args.config)
        model = resolve_model(args.model, config, args.split or "default", args.results)
        generation = generation_settings(config, None)
    if args.max_new_tokens is not None:
        generation = dataclasses.replace(generation, max_new_tokens=args.max_new_tokens)
    split = args.split or model.split or "default"
    table = read_split(args.results, split)
    cell = resolve_cell(args.cell, table)
    pert = resolve_pert(args.pert, table, args.allow_unknown)
    notes = training_notes(table, cell, pert, split)
    for note in notes:
        log.warning(note)
    return Setup(cell, pert, split, model, generation, table, notes)
