"""argparse pieces every step shares: its two JSON settings arguments (see core.settings)."""

from __future__ import annotations

import argparse
import json


def settings_type(text: str) -> dict:
    """argparse type for `--settings` and `--run`: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_settings_arguments(parser: argparse.ArgumentParser, step: str, required: bool = True) -> None:
    """`--settings` and `--run`: the two halves of a step's settings (`synthpert.core.settings`)
    as the rules pass them; `synthpert.core.settings.for_step(config, step, ...)` builds both."""
    parser.add_argument(
        "--settings", required=required, type=settings_type, default=None,
        help=f"JSON: what decides the output ({step} settings; a rule's params)",
    )  # fmt: skip
    parser.add_argument(
        "--run", type=settings_type, default={}, help=f"JSON: how the step runs ({step} settings; never a re-run trigger)"
    )
