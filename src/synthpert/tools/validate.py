"""`synthpert validate`: check a configuration before running anything: the schema (with
its defaults filled in, as the workflow does) and the cross-references between sections."""

from __future__ import annotations

import argparse
from pathlib import Path

from synthpert.core.config import load
from synthpert.core.splits import splits
from synthpert.errors import CommandError, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="configuration file (YAML)")


def main(args: argparse.Namespace) -> None:
    try:
        config = load(args.config)
    except ConfigError as err:
        raise CommandError(f"configuration {args.config} is invalid: {err}") from None
    print(
        f"{args.config}: valid; cell lines {', '.join(config['data']['cells'])}; splits {', '.join(splits(config))}; "
        f"rows {', '.join(config['evaluate']['rows'])}"
    )
