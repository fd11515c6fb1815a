"""The evaluation's questions as requests, and their answers as prediction records: shared
by `synthpert predict`, `ask` and `screen`, so all three ask and score alike."""

from __future__ import annotations

import polars as pl

from synthpert.core import prompts
from synthpert.core.labels import DOWN, NOT_DE, UP, class_probabilities
from synthpert.core.settings import Generation
from synthpert.errors import CommandError
from synthpert.llm.requests import Request, Response


def qid_expr() -> pl.Expr:
    return pl.concat_str(["cell", "pert", "gene"], separator=":")


def question_request(q: dict, task: str, generation: Generation, local: bool) -> Request:
    """The request asking question `q` (qid, cell, pert, gene, and its evidence block
    when it has an `evidence` value: `with_evidence`) as `task`, tagged `qid|task`.

    A local model starts its reasoning after a `<think>` prefill and its probabilities
    of the task's answer options are read afterwards."""
    return Request(
        messages=prompts.question_messages(q["cell"], q["pert"], q["gene"], task, q.get("evidence")),
        **generation.request_fields(),
        prefill="<think>\n" if local else "",
        options=prompts.answer_options(task) if local else (),
        tag=f"{q['qid']}|{task}",
    )


def with_evidence(rows: pl.DataFrame, evidence: pl.DataFrame, what: str) -> pl.DataFrame:
    """`rows` with column `evidence`: the `text` of each question's block in an evidence
    table (`synthpert evidence-table`). Every question must have its block: a table built
    for other questions (another split, another sample) stops here."""
    key = ["cell", "pert", "gene"]  # evaluation.evidence.KEY (not imported: it loads scikit-learn)
    table = evidence.select(*key, pl.col("text").alias("evidence")).unique(subset=key, keep="first")
    joined = rows.with_row_index("_i").join(table, on=key, how="left").sort("_i").drop("_i")
    missing = joined.filter(pl.col("evidence").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise CommandError(
            f"{what}: {missing.height} of {rows.height} questions have no block in the evidence table "
            f"(e.g. {first['cell']}:{first['pert']}:{first['gene']}); rebuild it from these questions "
            "(rule evidence_table, synthpert evidence-table --questions)"
        )
    return joined


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
FAILED = "failed"  # the status of a request that failed: counted apart, never scored


def answer_records(rows: pl.DataFrame, requests: list[Request], responses: list[Response]) -> list[dict]:
    """One prediction record (the columns of `PREDICTION_SCHEMA`) per request, in order.

    `rows` are the questions (qid, cell, pert, gene, label) that `requests` ask, tagged
    `qid|task`; `responses` the answer to each request, in the same order. A failed request
    gets status `failed` and no prediction or score (the metrics leave it out)."""
    by_qid = {q["qid"]: q for q in rows.iter_rows(named=True)}
    records = []
    for req, resp in zip(requests, responses, strict=True):
        qid, task = req.tag.split("|")
        q = by_qid[qid]
        record = {"qid": qid, "cell": q["cell"], "pert": q["pert"], "gene": q["gene"], "label": q["label"],
                  "task": task, "raw_text": resp.text, "finish_reason": resp.finish_reason}  # fmt: skip
        if resp.failed:
            unscored = dict.fromkeys(("pred", "score_de", "score_up", "score_source", "p_not_de", "p_down", "p_up"))
            records.append(record | unscored | {"status": FAILED, "raw_text": resp.error or ""})
        else:
            records.append(record | score_row(task, resp.text, resp.finish_reason, resp.option_logprobs))
    return records


def refuse_failures(responses: list[Response], what: str, log_path, allowed: bool = False, setting: str | None = None) -> None:
    """Stop unless `allowed`, when a request failed for good (a permanent failure: another
    run gets the same); `what` names the step and its job, `setting` the one that allows it."""
    failed = [r for r in responses if r.failed]
    if not failed or allowed:
        return
    first = failed[0]
    allow = (
        f" Set {setting}: true to write them with those marked failed: the tables count them in n_failed "
        f"and never score them" if setting else ""
    )
    raise CommandError(
        f"{what}: {len(failed)} of {len(responses)} requests failed for good (e.g. {first.tag}: {first.error}); "
        f"a failure is never an answer, so nothing is written (the answers are kept in {log_path}).{allow}"
    )


def question_shard(questions: pl.DataFrame, cell: str, shard: int, shards: int) -> pl.DataFrame:
    """The questions of one cell line and shard (round-robin over the sorted questions)."""
    rows = questions.filter(pl.col("cell") == cell).sort("qid")
    if rows.height == 0:
        raise CommandError(f"no questions for cell line {cell!r}; cells present: {questions['cell'].unique().sort().to_list()}")
    if not 0 <= shard < shards:
        raise CommandError(f"shard {shard} out of range: evaluate.shards is {shards}")
    return rows.with_row_index("_i").filter(pl.col("_i") % shards == shard).drop("_i")
