"""Step 5a: a model row answers the held-out questions of one (split, cell line, shard).

Each question is asked as the paper's three-class question (task `de3`, Appendix C.1);
differentially expressed tuples are also asked the direction-only question (`dir`, C.2).

Scores: a local model reasons, then we read its own probabilities of the answer options
after that reasoning (`score_source = probabilities`), so AUROC ranks real confidences and
every question gets an answer. An API model without log-probabilities is scored with the
paper's mapping (up/down = 1, not DE = 0, unparsed = 0.5; `score_source = label_mapping`)
and an unparsed answer stays unparsed (counted wrong by the metrics, never dropped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import write_parquet
from synthpert.core.rows import ADAPTER_ROWS
from synthpert.core.settings import Predict
from synthpert.errors import CommandError
from synthpert.evaluation.answers import PREDICTION_SCHEMA, answer_records, build_requests
from synthpert.llm.backends import make_backend
from synthpert.llm.requests import RequestLog

log = logging.getLogger(__name__)


def question_shard(questions: pl.DataFrame, cell: str, shard: int, shards: int) -> pl.DataFrame:
    """The questions of one cell line and shard (round-robin over the sorted questions)."""
    rows = questions.filter(pl.col("cell") == cell).sort("qid")
    if rows.height == 0:
        raise CommandError(f"no questions for cell line {cell!r}; cells present: {questions['cell'].unique().sort().to_list()}")
    if not 0 <= shard < shards:
        raise CommandError(f"shard {shard} out of range: evaluate.shards is {shards}")
    return rows.with_row_index("_i").filter(pl.col("_i") % shards == shard).drop("_i")


def add_arguments(parser) -> None:
    parser.add_argument("--questions", required=True, type=Path)
    parser.add_argument("--row", required=True, help="model row: base, sft_data, synthpert, teacher ...")
    parser.add_argument("--split", required=True)
    parser.add_argument("--cell", required=True)
    parser.add_argument("--shard", required=True, type=int)
    parser.add_argument("--adapter", type=Path, default=None, help="LoRA adapter (trained rows)")
    add_settings_arguments(parser, "predict")
    parser.add_argument("--out", required=True, type=Path)


def main(args) -> None:
    settings = Predict.from_cli(args.settings, args.run)
    if args.row in ADAPTER_ROWS and args.adapter is None:
        raise CommandError(f"row {args.row!r} is a fine-tuned student: pass --adapter")
    rows = question_shard(pl.read_parquet(args.questions), args.cell, args.shard, settings.shards)
    local = settings.model.local
    requests = build_requests(rows, settings.generation, local)
    backend = make_backend(settings.model.spec(), adapter=str(args.adapter) if args.adapter else None)
    request_log = RequestLog(args.out.with_suffix(".requests.jsonl"))
    responses = backend.run(requests, request_log, desc=f"{args.row} {args.cell}#{args.shard}")
    df = pl.DataFrame(answer_records(rows, requests, responses, backend.model), schema=PREDICTION_SCHEMA)
    write_parquet(df, args.out)
    usage = request_log.usage()
    log.info("%d answers (%s); usage %s", df.height, df["status"].value_counts().to_dicts(), usage)
