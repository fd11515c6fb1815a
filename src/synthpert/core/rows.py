"""The rows of the tables: which are answered by a language model, which by a trained
adapter, and which `models:` entry each model row asks."""

from __future__ import annotations

from pathlib import Path

BASELINE_ROWS = ("majority", "transfer", "gene_prior", "knn")  # computed without a language model
TRAINED_ROWS = ("synthpert", "sft_data", "synthpert_balanced")  # the variants `train` can fit
# Variants `grpo` fits by reinforcement learning on the labels, and the SFT row each starts from.
RL_ROWS = {"synthpert_grpo": "synthpert"}
ADAPTER_ROWS = (*TRAINED_ROWS, *RL_ROWS)  # the rows answered with a fine-tuned adapter
LLM_ROWS = ("base", *ADAPTER_ROWS, "teacher")
ROWS = (*BASELINE_ROWS, *LLM_ROWS)


def row_model_name(row: str, config: dict) -> str:
    """The `models:` entry an LLM row asks: the teacher row asks the trace model, every
    other row (base and the fine-tuned ones) the student."""
    return config["traces"]["model"] if row == "teacher" else config["train"]["model"]


def engine_rows(config: dict) -> list[str]:
    """The rows one vLLM engine answers together in each evaluation shard: the student's
    base and fine-tuned rows, when the student is served by `vllm` (its base weights are
    loaded once per shard rather than once per row). Empty otherwise: one job per row."""
    student = config["train"]["model"]
    if config["models"][student]["backend"] != "vllm":
        return []
    together = [r for r in config["evaluate"]["rows"] if r in LLM_ROWS and row_model_name(r, config) == student]
    return together if len(together) > 1 else []


def adapter_dir(split: str, row: str, results: str | Path = "results") -> Path:
    """Where `train` writes the PEFT adapter of a trained row, and where it is read from."""
    return Path(results) / "models" / split / row / "adapter"


def adapter_layout(path: str | Path) -> tuple[str, str] | None:
    """(split, row) of an adapter folder laid out as `adapter_dir` lays it out, else None."""
    path = Path(path).resolve()
    if path.name == "adapter" and path.parent.parent.parent.name == "models":
        return path.parent.parent.name, path.parent.name
    return None
