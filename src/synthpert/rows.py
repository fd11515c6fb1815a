"""The rows of the tables: which are answered by a language model, which by a trained
adapter, and which `models:` entry each model row asks."""

from __future__ import annotations

LLM_ROWS = {"base", "sft_data", "synthpert", "synthpert_balanced", "teacher"}
TRAINED_ROWS = {"sft_data", "synthpert", "synthpert_balanced"}


def row_model_name(row: str, config: dict) -> str:
    """The `models:` entry an LLM row asks: the teacher row asks the trace model, every
    other row (base and the fine-tuned ones) the student."""
    return config["traces"]["model"] if row == "teacher" else config["train"]["model"]
