"""Where the workflow keeps its results: the one owner of the layout under `results/`.
The rules' input functions, the plan and the tools compute paths here; the rules declare
the same names literally (Snakemake's way), and tests/test_paths.py checks the two agree."""

from __future__ import annotations

from pathlib import Path

from synthpert.core import rows, splits

RESULTS = Path("results")


def split_table(split: str, results: str | Path = RESULTS) -> Path:
    """Every PerturbQA tuple with its role (train/test) in one split."""
    return Path(results) / "data" / "splits" / f"{split}.parquet"


def trace_sample(split: str, results: str | Path = RESULTS) -> Path:
    return Path(results) / "traces" / split / "sample.parquet"


def _traces(split: str, cell: str, evidence: bool, results: str | Path) -> Path:
    return Path(results) / "traces" / split / ("evidence" if evidence else "") / cell


def trace_shard(split: str, cell: str, shard: int, results: str | Path = RESULTS, evidence: bool = False) -> Path:
    """The teacher's traces of one shard of one training cell line (written with each
    tuple's evidence block under `evidence/`)."""
    return _traces(split, cell, evidence, results) / f"{shard}.parquet"


def graded_shard(split: str, cell: str, shard: int, results: str | Path = RESULTS, evidence: bool = False) -> Path:
    """The critic's grades of one shard's traces."""
    return _traces(split, cell, evidence, results) / f"{shard}.graded.parquet"


def questions(split: str, results: str | Path = RESULTS) -> Path:
    return Path(results) / "eval" / split / "questions.parquet"


def evidence_table(split: str, results: str | Path = RESULTS) -> Path:
    """The evidence block of every question of a split (`synthpert evidence-table`)."""
    return Path(results) / "evidence" / f"{split}.parquet"


def trace_evidence_table(split: str, results: str | Path = RESULTS) -> Path:
    """The evidence block of every tuple of a split's trace sample (the evidence traces)."""
    return Path(results) / "evidence" / f"{split}.traces.parquet"


def predictions(split: str, row: str, cell: str, shard: int | None = None, results: str | Path = RESULTS) -> Path:
    """A row's answers for one test cell line: per shard for a model row, whole for a
    baseline (`shard` None)."""
    folder = Path(results) / "predictions" / split / row
    return folder / f"{cell}.parquet" if shard is None else folder / cell / f"{shard}.parquet"


def adapter_dir(split: str, row: str, results: str | Path = RESULTS) -> Path:
    """Where `train` (or `grpo`) writes the PEFT adapter of a fine-tuned row, and where it is read from."""
    return Path(results) / "models" / split / row / "adapter"


def adapter_layout(path: str | Path) -> tuple[str, str] | None:
    """(split, row) of an adapter folder laid out as `adapter_dir` lays it out, else None."""
    path = Path(path).resolve()
    if path.name == "adapter" and path.parent.parent.parent.name == "models":
        return path.parent.parent.name, path.parent.name
    return None


def request_log_path(out: str | Path) -> Path:
    """`<out without .parquet>.requests.jsonl`: the append-only request log of one output.
    It is no rule's output (Snakemake deletes a failed job's outputs; a log keeps what was
    paid for), so a rerun asks only what it lacks."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".parquet") + ".requests.jsonl")


def request_logs(config: dict, results: str | Path = RESULTS) -> list[Path]:
    """Every request log the configured traces, critic and model-row jobs write, whether
    it exists yet or not."""
    logs = []
    for split in splits.splits(config):
        for evidence in rows.trace_kinds(config):
            for cell in splits.train_cells(config, split):
                for shard in range(config["traces"]["shards"]):
                    logs.append(request_log_path(trace_shard(split, cell, shard, results, evidence)))
                    logs.append(request_log_path(graded_shard(split, cell, shard, results, evidence)))
        for row in config["evaluate"]["rows"]:
            if row in rows.LLM_ROWS:
                for cell in splits.test_cells(config, split):
                    for shard in range(config["evaluate"]["shards"]):
                        logs.append(request_log_path(predictions(split, row, cell, shard, results)))
    return logs
