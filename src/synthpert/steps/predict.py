"""Step 5a: a model row answers the held-out questions of one (split, cell line, shard);
several rows of one model (the student's base and adapters) in one job where one engine
can serve them all (`backend: vllm`), so the model is loaded once per shard.

Each question is asked as the paper's three-class question (task `de3`, Appendix C.1);
differentially expressed tuples are also asked the direction-only question (`dir`, C.2).
An evidence row (`base_evidence`, `teacher_evidence`) asks the same questions with each
question's evidence block after the query, read from the split's evidence table
(`--evidence`, docs/evidence.md); the other rows never read it.

Scores: a local model reasons, then we read its own probabilities of the answer options
after that reasoning (`score_source = probabilities`), so AUROC ranks real confidences and
every question gets an answer. An API model without log-probabilities is scored with the
paper's mapping (up/down = 1, not DE = 0, unparsed = 0.5; `score_source = label_mapping`)
and an unparsed answer stays unparsed (counted wrong by the metrics, never dropped).

A failed request is not an answer: a transient failure stops the job (the rerun asks it
again), a permanent one too unless `evaluate.allow_failures`, which writes it with status
`failed` (no prediction, no score; the tables count it in `n_failed`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import write_parquet
from synthpert.core.paths import adapter_layout, request_log_path
from synthpert.core.rows import ADAPTER_ROWS, uses_evidence
from synthpert.core.settings import Predict
from synthpert.errors import CommandError
from synthpert.evaluation.answers import (
    PREDICTION_SCHEMA,
    answer_records,
    build_requests,
    question_shard,
    refuse_failures,
    with_evidence,
)
from synthpert.llm.backends import backend_family
from synthpert.llm.budget import spending_guard
from synthpert.llm.requests import RequestLog, run_requests

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--questions", required=True, type=Path)
    parser.add_argument("--row", required=True, nargs="+",
                        help="model row(s) of one model: base, sft_data, synthpert, teacher ... (several: one engine answers them all)")
    parser.add_argument("--split", required=True)
    parser.add_argument("--cell", required=True)
    parser.add_argument("--shard", required=True, type=int)
    parser.add_argument("--adapter", type=Path, nargs="*", default=[],
                        help="LoRA adapter of each trained row, in the order of --row")
    parser.add_argument("--evidence", type=Path, default=None,
                        help="evidence table of the split (results/evidence/{split}.parquet): evidence rows only")
    add_settings_arguments(parser, "predict")
    parser.add_argument("--out", required=True, type=Path, nargs="+", help="one file per --row")


def row_adapters(row_names: list[str], adapters: list[Path]) -> list[Path | None]:
    """The adapter of each row (None for base and API rows): trained rows take the given
    adapters in order, and an adapter laid out by `train` must be that row's."""
    trained = [r for r in row_names if r in ADAPTER_ROWS]
    if len(adapters) != len(trained):
        raise CommandError(f"rows {row_names} need {len(trained)} adapter(s) (one per fine-tuned row: {trained}), "
                           f"got {len(adapters)}: pass --adapter for each")
    given = dict(zip(trained, adapters))
    for row, adapter in given.items():
        layout = adapter_layout(adapter)
        if layout is not None and layout[1] != row:
            raise CommandError(f"--adapter {adapter} is the adapter of row {layout[1]!r}, not of {row!r}")
    return [given.get(row) for row in row_names]


def evidence_rows(row_names: list[str], evidence: Path | None) -> bool:
    """Whether the rows ask with the evidence: all of them or none (one job asks one list
    of requests), and the evidence table is given exactly when they do."""
    shown = {uses_evidence(r) for r in row_names}
    if len(shown) > 1:
        raise CommandError(f"rows {row_names} mix evidence rows and plain rows: answer them in separate jobs")
    (shown,) = shown
    if shown and evidence is None:
        raise CommandError(f"rows {row_names} are shown the evidence: pass --evidence results/evidence/SPLIT.parquet")
    if not shown and evidence is not None:
        raise CommandError(f"rows {row_names} are asked without evidence: --evidence is for evidence rows only")
    return shown


def main(args) -> None:
    settings = Predict.from_cli(args.settings, args.run)
    if len(args.out) != len(args.row):
        raise CommandError(f"--out names {len(args.out)} file(s) for {len(args.row)} row(s): one per row")
    adapters = row_adapters(args.row, args.adapter)
    rows = question_shard(pl.read_parquet(args.questions), args.cell, args.shard, settings.shards)
    if evidence_rows(args.row, args.evidence):
        rows = with_evidence(rows, pl.read_parquet(args.evidence), f"predict {' '.join(args.row)}")
    requests = build_requests(rows, settings.generation, settings.model.local)
    backends = backend_family(settings.model, [None if a is None else str(a) for a in adapters])
    for row, out, backend in zip(args.row, args.out, backends):
        what = f"predict {row} {args.cell}#{args.shard}"
        with RequestLog(request_log_path(out)) as request_log:
            guard = spending_guard(settings.model, settings.budget, request_log.path)  # an API row's budget
            responses = run_requests(backend, requests, request_log, guard, what)
            usage = request_log.usage()
        refuse_failures(responses, what, request_log.path, settings.allow_failures, "evaluate.allow_failures")
        df = pl.DataFrame(answer_records(rows, requests, responses), schema=PREDICTION_SCHEMA)
        write_parquet(df, out)
        log.info("%s: %d answers (%s); usage %s", row, df.height, df["status"].value_counts().to_dicts(), usage)
