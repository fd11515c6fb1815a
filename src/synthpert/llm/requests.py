"""One chat interface for every LLM of the workflow (teacher, critic, students, API rows).

A `Request` is content-addressed: `Request.key(model)` hashes the model id, the messages
and every generation parameter (not the caller's `tag`), so the same question asked of
the same model with the same settings has the same key in every run.

A `RequestLog` is an append-only JSONL file, one line per finished request, written
(and fsync'ed) the moment the answer arrives. Backends send only the requests whose key
has no line yet, so a killed run resumes where it stopped and never pays twice.

Which lines count as done: every line. Transient failures (HTTP 429, 5xx, connection
errors, time-outs) are retried inside the run and are never written; only the final
outcome of a request is: its answer (finish_reason "stop" or "length"), or an error line
(finish_reason "error") after a permanent failure (any other HTTP 4xx, an unusable
reply) or after `max_retries` transient failures in a row. Such an error line is final on
purpose: a request the endpoint rejects is not resent on every run. A run that is
interrupted leaves no line for the requests it had in flight, and the next run sends
them again. To retry recorded errors, delete their lines (or the log). When a key has
several lines (two runs writing one log), the last one wins.

The backends (`llm.openai_api.OpenAIBackend`, `llm.local.LocalBackend`, `llm.vllm_engine.VLLMBackend`) are built
from one `models:` entry of the configuration by `make_backend`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from synthpert.errors import CommandError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "error")


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

    def key(self, model: str) -> str:
        """SHA-256 of the model id and every field except `tag` (the content address)."""
        # The fields as `dataclasses.asdict` gives them (same JSON), without its deep copy:
        # a plan of the paper's evaluation computes a million keys.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tag"}
        payload = json.dumps({"model": model, **fields}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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

    @classmethod
    def from_dict(cls, data: dict) -> Response:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class RequestLog:
    """Append-only JSONL of finished requests (see the module docstring for what is done)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._done: dict[str, Response] = {}
        self._usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0}
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
            self._remember(response)

    def _remember(self, response: Response) -> None:
        self._done[response.key] = response
        self._usage["requests"] += 1
        self._usage["prompt_tokens"] += response.prompt_tokens
        self._usage["completion_tokens"] += response.completion_tokens
        self._usage["errors"] += response.finish_reason == "error"

    def __contains__(self, key: str) -> bool:
        return key in self._done

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: str) -> Response | None:
        return self._done.get(key)

    def append(self, response: Response, model: str = "") -> None:
        """Write one line and fsync it, so a kill right after loses nothing."""
        if response.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {response.finish_reason!r}")
        record = {**dataclasses.asdict(response), "model": model, "time": time.time()}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._remember(response)

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
        """Requests, tokens and errors over every line of the log (all runs)."""
        return dict(self._usage)


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
        with self._lock:
            self.tokens += response.prompt_tokens + response.completion_tokens


class Backend(Protocol):
    model: str

    def run(
        self,
        requests: Sequence[Request],
        log: RequestLog,
        guard: SpendingGuard | None = None,
        desc: str = "requests",
    ) -> dict[str, Response]: ...


def plan(requests: Sequence[Request], model: str, log: RequestLog) -> tuple[dict[str, Response], dict[str, Request]]:
    """Split requests into answers already in the log and the distinct ones still to send."""
    done: dict[str, Response] = {}
    pending: dict[str, Request] = {}
    for request in requests:
        key = request.key(model)
        answer = log.get(key)
        if answer is not None:
            done[key] = answer
        else:
            pending.setdefault(key, request)
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


def request_log_path(out: Path) -> Path:
    """`<out without .parquet>.requests.jsonl`: the append-only log of one output."""
    return out.with_name(out.name.removesuffix(".parquet") + ".requests.jsonl")


def run_requests(backend, requests: list[Request], log: RequestLog, guard: SpendingGuard | None, desc: str) -> dict:
    """Send what the log lacks; if the guard stopped the run, say what is left and stop."""
    responses = backend.run(requests, log, guard=guard, desc=desc)
    keys = {r.key(backend.model) for r in requests}
    missing = len(keys - responses.keys())
    if missing:
        stopped = guard is not None and guard.exhausted
        why = f"the spending guard stopped the run ({guard.stop_reason})" if stopped else "no answer came back"
        raise CommandError(
            f"{desc}: {why} with {len(keys) - missing} of {len(keys)} requests answered, {missing} missing "
            f"(never sent, so unpaid); nothing is written but the answers, kept in {log.path}: rerunning "
            f"(with a higher limit) resumes where it stopped and pays for no answer twice"
        )
    return responses
