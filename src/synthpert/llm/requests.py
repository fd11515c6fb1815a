"""One chat interface for every LLM of the workflow (teacher, critic, students, API rows).

A `Request` is content-addressed: `Request.key(model)` hashes the model id, the messages
and every generation parameter (not the caller's `tag`) in a canonical form: numbers are
stored as their type's value (`temperature: 0` and `0.0` are one request), so the same
question asked of the same model with the same settings has the same key in every run.
`Request.legacy_keys` gives the keys older versions computed for it (other number forms,
former model ids): an answer logged under one of them is found and re-logged under the
canonical key, so no answer already paid for is asked again.

A `RequestLog` is an append-only JSONL file, one line per finished request, written
(and fsync'ed) the moment the answer arrives. Backends send only the requests whose key
has no final line yet, so a killed run resumes where it stopped and never pays twice.

Which lines are final: an answer (finish_reason "stop" or "length"), and a *permanent*
failure (finish_reason "error": any HTTP 4xx but 408/409/429, a content filter, a reply
without choices). A *transient* failure (429, 5xx, connection errors, time-outs that
outlast `max_retries`) is logged with `transient: true` as a fact about the run, but it is
not final: the next run asks it again. A run that is interrupted leaves no line for the
requests it had in flight, and the next run sends them again. When a key has several
lines (two runs writing one log), the last one wins.

A failure is never an answer: `run_requests` stops the step when a request failed
transiently (after every other answer is logged), and returns permanent failures as
such; each step decides what it does with them (predict refuses them unless
`evaluate.allow_failures`, traces and the critic never keep them).

The backends (`llm.openai_api.OpenAIBackend`, `llm.local.LocalBackend`, `llm.vllm_engine.VLLMBackend`) are built
from one `models:` entry of the configuration by `make_backend`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from synthpert.errors import CommandError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "error")
CANONICAL_NUMBERS = {"max_new_tokens": int, "temperature": float, "top_p": float}
LEGACY_TRANSIENT = "gave up after"  # how older logs worded a transient failure


def transient_record(record: dict) -> bool:
    """Whether a request-log line is a transient failure (lines written before failures had
    the flag say so in their error text: retries that gave up)."""
    if "transient" in record:
        return bool(record["transient"])
    return record.get("finish_reason") == "error" and str(record.get("error") or "").startswith(LEGACY_TRANSIENT)


def _digest(model: str, fields: dict) -> str:
    payload = json.dumps({"model": model, **fields}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Request:
    """One chat request. `prefill` and `options` only work with the local backend;
    `response_format` (the JSON text of an OpenAI response_format) only with openai."""

    messages: tuple[tuple[str, str], ...]
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    reasoning_effort: str | None = None
    response_format: str | None = None
    prefill: str = ""
    options: tuple[str, ...] = ()
    option_tag: str = "answer"
    tag: str = ""

    def __post_init__(self) -> None:
        # Accept lists from callers, store tuples (the dataclass is frozen and hashable).
        messages = tuple(tuple(m) for m in self.messages)
        if not messages:
            raise ValueError("a Request needs at least one message")
        for message in messages:
            if len(message) != 2 or message[0] not in ROLES or not isinstance(message[1], str):
                raise ValueError(f"a message must be (role, text) with role in {ROLES}; got {message!r}")
        object.__setattr__(self, "messages", messages)
        object.__setattr__(self, "options", tuple(self.options))
        # One canonical value per number: `0` and `0.0` are the same temperature, `256.0` the same budget.
        for name, kind in CANONICAL_NUMBERS.items():
            value = getattr(self, name)
            if kind is int and float(value) != int(value):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            object.__setattr__(self, name, kind(value))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.response_format is not None:
            try:
                json.loads(self.response_format)
            except json.JSONDecodeError as err:
                raise ValueError(f"response_format is not JSON text: {err}") from None

    def _fields(self) -> dict:
        # The fields as `dataclasses.asdict` gives them (same JSON), without its deep copy:
        # a plan of the paper's evaluation computes a million keys.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tag"}

    def key(self, model: str) -> str:
        """SHA-256 of the model id and every field except `tag` (the content address)."""
        return _digest(model, self._fields())

    def legacy_keys(self, models: Sequence[str]) -> list[str]:
        """Keys that earlier versions gave this request under `models` (the model's current
        and former ids): its whole-number floats written as integers (those versions hashed
        the numbers as configured), and every form under a former id. Never the current key."""
        fields = self._fields()
        whole = [name for name, kind in CANONICAL_NUMBERS.items() if kind is float and fields[name].is_integer()]
        variants = []
        for size in range(len(whole) + 1):
            for names in itertools.combinations(whole, size):
                variants.append({**fields, **{name: int(fields[name]) for name in names}})
        current = self.key(models[0]) if models else None
        keys = (_digest(model, variant) for model in models for variant in variants)
        return [key for key in dict.fromkeys(keys) if key != current]


@dataclass
class Response:
    key: str
    tag: str
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    option_logprobs: dict[str, float] | None = None
    error: str | None = None
    cached_tokens: int = 0  # of prompt_tokens, billed at the cached-input price
    transient: bool = False  # a failure worth asking again (not final); see the module docstring
    served_model: str | None = None  # the model the server says answered (API models)

    @property
    def failed(self) -> bool:
        """A failure, never an answer: nothing in it may be scored, trained on or graded."""
        return self.finish_reason == "error"

    @classmethod
    def from_dict(cls, data: dict) -> Response:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names} | {"transient": transient_record(data)})


class RequestLog:
    """Append-only JSONL of finished requests (see the module docstring for what is done)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._done: dict[str, Response] = {}  # final lines: answers and permanent failures
        self._usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0, "transient_errors": 0}
        self._served: Counter[str] = Counter()  # served model names of the answers
        self._lock = threading.Lock()
        self._file = None  # opened at the first append, kept open (one open per line is slow)
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0  # byte offset just after the last complete, parseable line
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                record = json.loads(line)
                response = Response.from_dict(record)
            except (ValueError, TypeError) as err:
                if good_end + len(line) == len(data):
                    # The last line of a run killed mid-write: drop it, so appends stay valid JSONL.
                    logger.warning("%s: dropping truncated last line %d", self.path, number)
                    with open(self.path, "r+b") as fh:
                        fh.truncate(good_end)
                        os.fsync(fh.fileno())
                    break
                raise CommandError(f"{self.path}: line {number} is not a request-log record ({err})") from None
            good_end += len(line)
            self._remember(response, counted="migrated_from" not in record)

    def _remember(self, response: Response, counted: bool = True) -> None:
        if response.transient:  # a fact about the run, not an answer: the next run asks again
            self._done.pop(response.key, None)
        else:
            self._done[response.key] = response
        if not counted:  # an answer re-logged under its canonical key: its usage is counted once
            return
        self._usage["requests"] += 1
        self._usage["prompt_tokens"] += response.prompt_tokens
        self._usage["completion_tokens"] += response.completion_tokens
        self._usage["errors"] += response.failed and not response.transient
        self._usage["transient_errors"] += response.transient
        if response.served_model and not response.failed:
            self._served[response.served_model] += 1

    def __contains__(self, key: str) -> bool:
        return key in self._done

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: str) -> Response | None:
        """The final line of `key` (an answer or a permanent failure), else None."""
        return self._done.get(key)

    def append(self, response: Response, model: str = "", migrated_from: str | None = None) -> None:
        """Write one line and fsync it, so a kill right after loses nothing. `migrated_from`:
        the legacy key of an answer already logged, re-logged under its canonical key."""
        if response.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {response.finish_reason!r}")
        record = {**dataclasses.asdict(response), "model": model, "time": time.time()}
        if migrated_from is not None:
            record["migrated_from"] = migrated_from
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._remember(response, counted=migrated_from is None)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def usage(self) -> dict:
        """Requests, tokens, permanent and transient errors over every line of the log (all
        runs), and the served model names of its answers (`served_models`, API models)."""
        return {**self._usage, "served_models": dict(self._served)}


OK, WAIT, STOP = "ok", "wait", "stop"  # what a guard says to a request about to be sent


class SpendingGuard:
    """Caps what one run may spend. `allow()` claims one request (call it right before
    sending); `charge()` adds the tokens of a finished one. Requests already in flight
    when the token cap is reached still finish, so `max_tokens` can be overshot by them.
    `llm.budget.BudgetGuard` adds a cap in dollars shared by every job of a step."""

    poll_s = 0.5  # how long a request told to WAIT waits before asking again

    def __init__(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0
        self.tokens = 0
        self.exhausted = False  # True once a request has been refused
        self.stop_reason = ""  # why, for the error that stops the step
        self._lock = threading.Lock()

    def claim(self, key: str = "", request: Request | None = None, wait: bool = True) -> str:
        """OK (send it, counted), STOP (send nothing more) or, if `wait`, WAIT (ask again in
        `poll_s`: requests in flight may free room). Never blocks on other jobs."""
        with self._lock:
            over = (self.max_requests is not None and self.requests >= self.max_requests) or (
                self.max_tokens is not None and self.tokens >= self.max_tokens
            )
            if over:
                self.exhausted = True
                self.stop_reason = f"the per-shard cap (max_requests {self.max_requests}, max_tokens {self.max_tokens}) is reached"
                return STOP
            self.requests += 1
            return OK

    def allow(self, key: str = "", request: Request | None = None) -> bool:
        """`claim`, waiting while it says WAIT (for callers that send one batch at a time)."""
        while (verdict := self.claim(key, request)) == WAIT:
            time.sleep(self.poll_s)
        return verdict == OK

    def charge(self, response: Response) -> None:
        """A reply came back (an answer, or a failure the server reported with its usage)."""
        with self._lock:
            self.tokens += response.prompt_tokens + response.completion_tokens

    def claim_retry(self, key: str, request: Request, wait: bool = True) -> str:
        """Another attempt of a claimed request (a retry): OK, WAIT or STOP like `claim`,
        not counted as another request. A dollar budget reserves each attempt."""
        return OK

    def release(self, key: str, maybe_billed: bool) -> None:
        """An attempt that brought no reply: an HTTP error (`maybe_billed` False), or a
        time-out or broken connection after which the server may have done the work."""


class Backend(Protocol):
    model: str  # the id that names its answers in the request keys
    legacy_models: tuple[str, ...]  # the ids older versions gave it: their log lines still answer

    def run(
        self,
        requests: Sequence[Request],
        log: RequestLog,
        guard: SpendingGuard | None = None,
        desc: str = "requests",
    ) -> dict[str, Response]: ...


def plan(
    requests: Sequence[Request], model: str, log: RequestLog, legacy_models: Sequence[str] = ()
) -> tuple[dict[str, Response], dict[str, Request]]:
    """Split requests into final lines already in the log and the distinct ones still to
    send. An answer logged under a legacy key of the request (`Request.legacy_keys`, the
    model's former ids `legacy_models`) is re-logged under its canonical key and reused."""
    done: dict[str, Response] = {}
    pending: dict[str, Request] = {}
    for request in requests:
        key = request.key(model)
        answer = log.get(key)
        if answer is not None:
            done[key] = answer
        else:
            pending.setdefault(key, request)
    if pending and len(log) > len(done):  # final lines no canonical key claims: older key forms?
        for key, request in list(pending.items()):
            for legacy in request.legacy_keys([model, *legacy_models]):
                old = log.get(legacy)
                if old is not None:
                    log.append(dataclasses.replace(old, key=key, tag=request.tag), model, migrated_from=legacy)
                    done[key] = log.get(key)
                    del pending[key]
                    break
    if done:
        logger.info("%d of %d distinct requests already answered in %s", len(done), len(done) + len(pending), log.path)
    return done, pending


def log_records(path: Path) -> list[dict]:
    """Every complete line of a request log as written (model and time included), read
    without changing the file, which a running job may be appending to: a last line
    without its newline is still being written and is left out (`RequestLog` would cut it)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    records = []
    for number, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise CommandError(f"{path}: line {number} is not a request-log record ({err})") from None
    return records


def final_keys(records: list[dict]) -> set[str]:
    """The keys of `records` (request-log lines, in order) whose last line is final: an
    answer or a permanent failure, not a transient failure."""
    final: dict[str, bool] = {}
    for record in records:
        final[record["key"]] = not transient_record(record)
    return {key for key, done in final.items() if done}


def request_log_path(out: Path) -> Path:
    """`<out without .parquet>.requests.jsonl`: the append-only log of one output."""
    return out.with_name(out.name.removesuffix(".parquet") + ".requests.jsonl")


def run_requests(backend, requests: list[Request], log: RequestLog, guard: SpendingGuard | None, desc: str) -> list[Response]:
    """The response to each request, in order: sends what the log lacks. Stops the step (a
    `CommandError`, after every other answer is logged) when the guard stopped it or a
    request failed transiently; a permanent failure is returned as one (`Response.failed`)."""
    responses = backend.run(requests, log, guard=guard, desc=desc)
    keys = [r.key(backend.model) for r in requests]
    missing = len(set(keys) - responses.keys())
    if missing:
        stopped = guard is not None and guard.exhausted
        why = f"the spending guard stopped the run ({guard.stop_reason})" if stopped else "no answer came back"
        raise CommandError(
            f"{desc}: {why} with {len(set(keys)) - missing} of {len(set(keys))} requests answered, {missing} missing "
            f"(never sent, so unpaid); nothing is written but the answers, kept in {log.path}: rerunning "
            f"(with a higher limit) resumes where it stopped and pays for no answer twice"
        )
    transient = [r for r in responses.values() if r.transient]
    if transient:
        raise CommandError(
            f"{desc}: {len(transient)} of {len(responses)} requests failed after their retries "
            f"(e.g. {transient[0].tag or transient[0].key[:12]}: {transient[0].error}); a failure is no answer, so "
            f"nothing is written but the {len(responses) - len(transient)} answers kept in {log.path}. "
            f"Rerun the same target once the endpoint is back: it asks exactly the failed requests again "
            f"(or raise the model's max_retries / timeout_s)"
        )
    served = Counter(r.served_model for r in responses.values() if r.served_model and not r.failed)
    if len(served) > 1:
        logger.warning(
            "%s: the answers come from %d different served models %s; name a dated snapshot "
            "(e.g. o4-mini-2025-04-16) in models: to pin one", desc, len(served), dict(served),
        )
    return [responses[key] for key in keys]
