"""`synthpert ask`: put one knockdown question to a model and show its answer.

The question is the evaluation's three-class question (paper C.1), asked the way
`synthpert predict` asks it: a local model reasons, then its own probabilities of the three
answers are read; an API model's tagged answer is parsed. How `--model`, `--cell`, `--pert`
and `--gene` are resolved and checked is `tools.question`'s, shared with `synthpert screen`.

Answers are cached in an append-only request log (`results/ask/requests.jsonl`), so
asking again costs no generation.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

from synthpert.core.labels import CLASS_NAMES, DOWN, NOT_DE, UP, display_cell
from synthpert.evaluation.answers import question_request
from synthpert.llm.requests import Request
from synthpert.tools.question import Model, add_common_arguments, answer, question_rows, reasoning_text, resolve_genes, setup

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- printing


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


def format_prompt(request: Request) -> str:
    """What `ask --show-prompt` prints: every message of the request, whole, and the
    start of the answer a local model is given (its `<think>` prefill)."""
    lines = ["prompt:"]
    for role, content in request.messages:
        lines += [f"[{role}]", content]
    if request.prefill:
        lines += ["[assistant, prefilled]", request.prefill.rstrip("\n")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--gene", required=True, help="the gene whose expression is asked about")
    parser.add_argument(
        "--cache", type=Path, default=None, help="request log of past answers (default: RESULTS/ask/requests.jsonl)"
    )
    parser.add_argument("--show-prompt", action="store_true", help="print the whole prompt the model is asked, then its answer")


def main(args: argparse.Namespace) -> None:
    s = setup(args)
    (gene,) = resolve_genes([args.gene], s.table, s.cell, args.allow_unknown)
    rows = question_rows(s.table, s.cell, s.pert, [gene])
    if args.show_prompt:
        print(format_prompt(question_request(rows.row(0, named=True), "de3", s.generation, s.model.model.local)) + "\n")
    cache = args.cache or args.results / "ask" / "requests.jsonl"
    record = answer(rows, s.model, s.generation, cache, desc=f"ask {s.model.name}").row(0, named=True)
    print(format_answer(record, rows["role"][0], s.model, s.notes))
