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

from synthpert import prompts
from synthpert.cli import CommandError, add_settings_arguments
from synthpert.rows import TRAINED_ROWS
from synthpert.io import write_parquet
from synthpert.labels import CLASS_NAMES, DOWN, NOT_DE, UP, class_probabilities
from synthpert.llm import Request, RequestLog, make_backend
from synthpert.settings import Generation, Predict

log = logging.getLogger(__name__)

TASK_OPTIONS = {
    "de3": (NOT_DE, DOWN, UP),
    "dir": (DOWN, UP),
}


def shard_rows(questions: pl.DataFrame, cell: str, shard: int, shards: int) -> pl.DataFrame:
    """The questions of one cell line and shard (round-robin over the sorted questions)."""
    rows = questions.filter(pl.col("cell") == cell).sort("qid")
    if rows.height == 0:
        raise CommandError(f"no questions for cell line {cell!r}; cells present: {questions['cell'].unique().sort().to_list()}")
    if not 0 <= shard < shards:
        raise CommandError(f"shard {shard} out of range: evaluate.shards is {shards}")
    return rows.with_row_index("_i").filter(pl.col("_i") % shards == shard).drop("_i")


def question_request(q: dict, task: str, generation: Generation, local: bool) -> Request:
    """The request asking question `q` (qid, cell, pert, gene) as `task`, tagged `qid|task`.

    A local model starts its reasoning after a `<think>` prefill and its probabilities
    of the task's answer options are read afterwards."""
    return Request(
        messages=prompts.question_messages(q["cell"], q["pert"], q["gene"], task),
        **generation.request_fields(),
        prefill="<think>\n" if local else "",
        options=tuple(CLASS_NAMES[c] for c in TASK_OPTIONS[task]) if local else (),
        tag=f"{q['qid']}|{task}",
    )


def build_requests(rows: pl.DataFrame, generation: Generation, local: bool) -> list[Request]:
    """Every question as `de3`; differentially expressed ones also as `dir`."""
    requests = []
    for q in rows.iter_rows(named=True):
        tasks = ["de3"] + (["dir"] if q["label"] != NOT_DE else [])
        requests += [question_request(q, task, generation, local) for task in tasks]
    return requests


def score_row(task: str, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    """Prediction, parse status and continuous score of one answer."""
    if logprobs:
        probs = class_probabilities(logprobs)
        pred = max(probs, key=probs.get)
        record = {"pred": pred, "status": "answered", "score_source": "probabilities"}
        if task == "de3":
            record["score_de"] = 1.0 - probs[NOT_DE]
        else:
            record["score_up"] = probs[UP]
        record |= {"p_not_de": probs.get(NOT_DE), "p_down": probs[DOWN], "p_up": probs[UP]}
        return record
    pred, status = prompts.parse_answer(text, finish_reason, task)
    record = {"pred": pred, "status": status, "score_source": "label_mapping"}
    if task == "de3":
        record["score_de"] = 0.5 if pred is None else float(pred != NOT_DE)
    else:
        record["score_up"] = 0.5 if pred is None else float(pred == UP)
    return record


PREDICTION_SCHEMA = {
    "qid": pl.String, "cell": pl.String, "pert": pl.String, "gene": pl.String, "label": pl.Int8,
    "task": pl.String, "raw_text": pl.String, "finish_reason": pl.String, "pred": pl.Int8,
    "status": pl.String, "score_de": pl.Float64, "score_up": pl.Float64, "score_source": pl.String,
    "p_not_de": pl.Float64, "p_down": pl.Float64, "p_up": pl.Float64,
}


def answer_records(rows: pl.DataFrame, requests: list[Request], responses: dict, model: str) -> list[dict]:
    """One prediction record (the columns of `PREDICTION_SCHEMA`) per request, in order.

    `rows` are the questions (qid, cell, pert, gene, label) that `requests` ask, tagged
    `qid|task`; `responses` are the backend's answers by request key for `model`."""
    by_qid = {q["qid"]: q for q in rows.iter_rows(named=True)}
    records = []
    for req in requests:
        qid, task = req.tag.split("|")
        resp = responses.get(req.key(model))
        if resp is None:
            raise CommandError(f"no answer for {req.tag}; rerun to resume")
        q = by_qid[qid]
        records.append(
            {"qid": qid, "cell": q["cell"], "pert": q["pert"], "gene": q["gene"], "label": q["label"],
             "task": task, "raw_text": resp.text, "finish_reason": resp.finish_reason}
            | score_row(task, resp.text, resp.finish_reason, resp.option_logprobs)
        )
    return records


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
    if args.row in TRAINED_ROWS and args.adapter is None:
        raise CommandError(f"row {args.row!r} is a fine-tuned student: pass --adapter")
    rows = shard_rows(pl.read_parquet(args.questions), args.cell, args.shard, settings.shards)
    local = settings.model.backend == "local"
    requests = build_requests(rows, settings.generation, local)
    backend = make_backend(settings.model.spec(), adapter=str(args.adapter) if args.adapter else None)
    request_log = RequestLog(args.out.with_suffix(".requests.jsonl"))
    responses = backend.run(requests, request_log, desc=f"{args.row} {args.cell}#{args.shard}")
    df = pl.DataFrame(answer_records(rows, requests, responses, backend.model), schema=PREDICTION_SCHEMA)
    write_parquet(df, args.out)
    usage = request_log.usage()
    log.info("%d answers (%s); usage %s", df.height, df["status"].value_counts().to_dicts(), usage)
