"""The evaluation splits: `default` (PerturbQA's own train/test column) and one
`<cell>_holdout` per held-out cell line (train on the others, test on every row of it)."""

from __future__ import annotations


def split_names(holdout: list[str]) -> list[str]:
    return ["default"] + [f"{cell}_holdout" for cell in holdout]


def splits(config: dict) -> list[str]:
    return split_names(config["data"]["holdout"])


def test_cells(config: dict, split: str) -> list[str]:
    """Cell lines whose rows are asked in a split's test set."""
    return config["data"]["cells"] if split == "default" else [split.removesuffix("_holdout")]


def train_cells(config: dict, split: str) -> list[str]:
    """Cell lines with training rows in a split (trace generation is sharded over them)."""
    if split == "default":
        return config["data"]["cells"]
    return [c for c in config["data"]["cells"] if c != split.removesuffix("_holdout")]
