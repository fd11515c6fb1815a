"""`synthpert ask`: put one knockdown question to a model and show its answer.

The question is the evaluation's three-class question (paper C.1), asked the way
`synthpert predict` asks it (`evaluation.answers.question_request`): a local model reasons, then its
own probabilities of the three answers are read; an API model's tagged answer is parsed.

This module also holds what `synthpert screen` shares with it:

* `--model` is a name in the configuration's `models:`, a model row of the tables
  (`base`, `teacher`, or a trained row such as `synthpert`, whose adapter is
  `results/models/{split}/{row}/adapter`), or the path of a PEFT adapter folder (its
  `adapter_config.json` names the base model; a configured local model with that base
  lends its settings, else the schema's defaults apply).
* Names are checked against the PerturbQA table of the split: an unknown cell line, gene
  or perturbation stops with the closest known names (a typo should not cost a model
  run); `--allow-unknown` answers about genes or perturbations PerturbQA lacks. A
  perturbation (or cell line) with no training row in the split is allowed and flagged:
  the model has never been taught about it.

Answers are cached in an append-only request log (`results/ask/requests.jsonl`), so
asking again costs no generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from synthpert.core.arguments import settings_type
from synthpert.core.config import SCHEMA
from synthpert.core.config import load as config_load
from synthpert.core.labels import CLASS_NAMES, DOWN, NOT_DE, UP, display_cell
from synthpert.core.prompts import parse_reasoning
from synthpert.core.rows import ADAPTER_ROWS, LLM_ROWS, adapter_dir, adapter_layout, row_model_name
from synthpert.core.settings import LOCAL_BACKENDS, Generation, Screen
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
class Model:
    """A model to ask: its configuration entry and, for a fine-tuned student, its adapter."""

    name: str  # the --model name, or the variant folder of an adapter path
    spec: dict
    adapter: str | None = None
    split: str | None = None  # the split an adapter path was trained on, when its layout says

    def describe(self) -> str:
        base = f"{self.spec['backend']} {self.spec['model']}"
        return f"{self.name} ({base} + adapter {self.adapter})" if self.adapter else f"{self.name} ({base})"


def model_defaults() -> dict:
    """The schema's defaults of a `models:` entry."""
    properties = yaml.safe_load(SCHEMA.read_text())["$defs"]["model"]["properties"]
    return {key: value["default"] for key, value in properties.items() if "default" in value}


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def adapter_model(path: Path, settings: dict) -> Model:
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
    if spec is None:
        spec = {**model_defaults(), "backend": "local", "model": base}
    layout = adapter_layout(path)  # the workflow's layout names the variant and its split
    if layout is not None:
        split, row = layout
        return Model(row, spec, str(path), split)
    return Model(path.resolve().name, spec, str(path))


def trained_adapter(name: str, split: str, results: Path) -> str:
    """The adapter of a trained row (`results/models/{split}/{row}/adapter`), which must exist."""
    adapter = adapter_dir(split, name, results)
    if not (adapter / "adapter_config.json").is_file():
        raise CommandError(
            f"model {name!r} is a fine-tuned student, but split {split!r} has no trained adapter "
            f"at {adapter}; train it first (snakemake {adapter}) or pass --split / an adapter folder"
        )
    return str(adapter)


def rule_model(name: str, settings: Screen, split: str, results: Path) -> Model:
    """The model of a screen rule: the resolved `models:` entry, with its adapter when it is a trained row."""
    return Model(name, settings.model.spec(), trained_adapter(name, split, results) if settings.trained else None)


def resolve_model(name: str, settings: dict, split: str, results: Path) -> Model:
    """`--model`: an adapter folder, a `models:` name, or a model row (see module docstring)."""
    if Path(name).is_dir():
        return adapter_model(Path(name), settings)
    models = settings["models"]
    if name in models:
        return Model(name, models[name])
    if name in LLM_ROWS:
        spec = models[row_model_name(name, settings)]
        return Model(name, spec, trained_adapter(name, split, results) if name in ADAPTER_ROWS else None)
    known = sorted({*models, *LLM_ROWS})
    raise CommandError(
        f"unknown model {name!r}: not an adapter folder, nor a model of the configuration or a model row "
        f"({', '.join(known)}){suggest(name, known)}"
    )


# --------------------------------------------------------------------------- names


def suggest(name: str, known, n: int = 3) -> str:
    """'; closest known: A, B' from difflib (case-insensitive), or '' when nothing is close."""
    by_upper = {k.upper(): k for k in known}
    close = difflib.get_close_matches(name.upper(), list(by_upper), n=n, cutoff=0.6)
    return f"; closest known: {', '.join(by_upper[c] for c in close)}" if close else ""


def read_split(results: Path, split: str) -> pl.DataFrame:
    """Every PerturbQA tuple with its role (train/test) in the split."""
    path = results / "data" / "splits" / f"{split}.parquet"
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


def answer(rows: pl.DataFrame, model: Model, generation: Generation, log_path: Path, desc: str) -> pl.DataFrame:
    """The model's three-class answer to every question (`PREDICTION_SCHEMA` columns, task
    `de3`); answers already in `log_path` are reused, new ones appended to it."""
    backend = make_backend(model.spec, adapter=model.adapter)
    local = model.spec["backend"] in LOCAL_BACKENDS
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


def format_answer(record: dict, role: str | None, model: Model, notes: list[str]) -> str:
    """What `ask` prints: question, answer, probabilities, measurement, reasoning."""
    cell = display_cell(record["cell"])
    lines = [
        f"question: knockdown of {record['pert']} in {cell} cells; effect on {record['gene']}",
        f"model:    {model.describe()}",
        *(f"note:     {note}" for note in notes),
    ]
    pred = record["pred"]
    lines.append(f"answer:   {CLASS_NAMES[pred] if pred is not None else 'none'} ({record['status']})")
    if record["p_up"] is not None:
        probs = [(NOT_DE, record["p_not_de"]), (DOWN, record["p_down"]), (UP, record["p_up"])]
        lines.append("probabilities: " + ", ".join(f"{CLASS_NAMES[c]} {p:.3f}" for c, p in probs))
    else:
        lines.append("probabilities: not available from this backend (answer parsed from the text)")
    if record["label"] is not None:
        lines.append(f"measured: {CLASS_NAMES[record['label']]} (PerturbQA, a {role} row of the split)")
    else:
        lines.append("measured: none in the PerturbQA table")
    reasoning = reasoning_text(record["raw_text"], record["finish_reason"])
    reasoning = reasoning or "(none: the model went straight to its answer)"
    lines += ["reasoning:", textwrap.indent(textwrap.fill(reasoning, width=96), "  ")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--gene", required=True, help="the gene whose expression is asked about")
    parser.add_argument(
        "--cache", type=Path, default=None, help="request log of past answers (default: RESULTS/ask/requests.jsonl)"
    )


def main(args: argparse.Namespace) -> None:
    s = setup(args)
    (gene,) = resolve_genes([args.gene], s.table, s.cell, args.allow_unknown)
    rows = question_rows(s.table, s.cell, s.pert, [gene])
    cache = args.cache or args.results / "ask" / "requests.jsonl"
    record = answer(rows, s.model, s.generation, cache, desc=f"ask {s.model.name}").row(0, named=True)
    print(format_answer(record, rows["role"][0], s.model, s.notes))
