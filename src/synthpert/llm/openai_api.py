"""The `openai` backend: chat completions against any OpenAI-compatible endpoint.

The SDK's own retries are switched off (`max_retries=0`) and done here instead, so they
are logged and testable: HTTP 429, 408, 409, 5xx, connection errors and time-outs are
retried with exponential back-off and full jitter (or after the server's `Retry-After`
seconds, when it sends one), at most `max_retries` times; a request whose retries all
fail is logged as a *transient* failure, which the next run asks again; other errors are
final. Each attempt is claimed from the spending guard (a dollar budget reserves every
attempt: each may be billed). See `synthpert.llm.requests` for what the log holds. The
model name the server says answered (`completion.model`, e.g. a dated snapshot behind an
alias) is logged with every answer.

Live mode runs `max_concurrency` workers over the pending requests (a bounded pool: the
same bound as a semaphore, without creating a task per request). Batch mode (spec
`batch_api: true`) submits the pending requests to the Batch API instead and records the
batch ids in `<log>.batches.json` before waiting, so a restarted run collects the
batches it already paid for instead of submitting them again.

Reasoning models (those given a `reasoning_effort`) reject `temperature` and `top_p`, so
those two are sent only when `reasoning_effort` is not set. The API key is read once from
the environment and scrubbed from every error text this module records or logs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import openai
from tqdm import tqdm

from synthpert.core.io import atomic_path
from synthpert.errors import CommandError
from synthpert.llm.backends import api_key
from synthpert.llm.identity import api_identity, legacy_api_identities
from synthpert.llm.requests import (
    OK,
    WAIT,
    Request,
    RequestLog,
    Response,
    SpendingGuard,
    plan,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT_STATUS = {408, 409, 429}
BATCH_MAX_REQUESTS = 50_000  # the Batch API's limit per input file
BATCH_FINAL = {"completed", "failed", "expired", "cancelled"}


def is_transient(err: openai.APIError) -> bool:
    """Worth retrying: rate limits, server errors, connection errors and time-outs."""
    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in TRANSIENT_STATUS or err.status_code >= 500
    return False


def retry_after(err: openai.APIError) -> float | None:
    """The server's `Retry-After` (or OpenAI's `retry-after-ms`) in seconds, if any."""
    response = getattr(err, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(response.headers[header]) * scale)
        except (KeyError, ValueError):
            continue
    return None


def response_from_completion(key: str, tag: str, completion: dict) -> Response:
    """A log record from a chat-completion body (live answer or Batch API output line)."""
    choices = completion.get("choices") or []
    usage = completion.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    tokens = {
        "prompt_tokens": usage.get("prompt_tokens") or 0,
        "completion_tokens": usage.get("completion_tokens") or 0,
        "cached_tokens": cached,
    }
    tokens["served_model"] = completion.get("model") or None
    if not choices:
        return Response(key, tag, "", "error", error="the reply has no choices", **tokens)
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    reason = choice.get("finish_reason")
    if reason == "length":
        return Response(key, tag, text, "length", **tokens)
    if reason == "content_filter":
        return Response(key, tag, text, "error", error="finish_reason content_filter", **tokens)
    return Response(key, tag, text, "stop", **tokens)


class OpenAIBackend:
    """Chat completions through the official SDK; see the module docstring."""

    backoff_base_s = 1.0  # first back-off ceiling; doubles per attempt
    backoff_cap_s = 60.0
    poll_first_s = 5.0  # Batch API polling interval; doubles up to poll_cap_s
    poll_cap_s = 60.0

    def __init__(self, spec: dict) -> None:
        self.name = spec["model"]  # what the endpoint is asked for
        self.model = api_identity(spec)  # what names its answers in the request keys
        self.legacy_models = legacy_api_identities(spec)  # what named them before (logs still valid)
        self._key = api_key(spec)  # fails now, before any request, when the variable is unset
        self.base_url = spec.get("base_url")
        self.max_concurrency = int(spec.get("max_concurrency", 16))
        self.max_retries = int(spec.get("max_retries", 6))
        self.timeout_s = float(spec.get("timeout_s", 600))
        self.batch_api = bool(spec.get("batch_api", False))
        # The HTTP client logs every request at INFO; keep that out of the step logs
        # unless someone configured that logger on purpose.
        http_log = logging.getLogger("httpx2")
        if http_log.level == logging.NOTSET:
            http_log.setLevel(logging.WARNING)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.name!r}, base_url={self.base_url!r})"

    def run(
        self,
        requests: Sequence[Request],
        log: RequestLog,
        guard: SpendingGuard | None = None,
        desc: str = "requests",
    ) -> dict[str, Response]:
        done, pending = plan(requests, self.model, log, self.legacy_models)
        for request in pending.values():
            if request.prefill:
                raise CommandError(f"model {self.name!r}: prefill needs the local backend (request {request.tag!r})")
            if request.max_new_tokens < 1:
                raise CommandError(f"model {self.name!r}: max_new_tokens must be >= 1 (request {request.tag!r})")
        runner = self._run_batches if self.batch_api else self._run_live
        with tqdm(total=len(pending), desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
            try:
                done.update(asyncio.run(runner(pending, log, guard, bar)))
            except openai.APIError as err:  # a Batch API call that failed for good
                raise CommandError(f"model {self.name!r}: {self._describe(err)}") from None
        return done

    # -- shared helpers ------------------------------------------------------------------

    def _client(self) -> openai.AsyncOpenAI:
        # Endpoints without authentication (api_key_env: null) still need some key for the SDK.
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._key or "EMPTY", max_retries=0, timeout=self.timeout_s
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key else text

    def _describe(self, err: openai.APIError) -> str:
        if isinstance(err, openai.APITimeoutError):
            text = f"timed out after {self.timeout_s:g} s"
        elif isinstance(err, openai.APIConnectionError):
            cause = err.__cause__
            text = f"connection error: {type(cause).__name__}: {cause}" if cause else f"connection error: {err.message}"
        elif isinstance(err, openai.APIStatusError):
            body = err.body if isinstance(err.body, dict) else {}
            text = f"http {err.status_code}: {body.get('message') or err.message}"
        else:
            text = f"{type(err).__name__}: {err}"
        return self._scrub(text)

    def _backoff(self, attempt: int, err: openai.APIError) -> float:
        server_says = retry_after(err)
        if server_says is not None:
            return server_says
        return random.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Await `call()`, retrying transient errors; re-raises the final error."""
        for attempt in itertools.count():
            try:
                return await call()
            except openai.APIError as err:
                if not is_transient(err) or attempt >= self.max_retries:
                    raise
                delay = self._backoff(attempt, err)
                logger.warning(
                    "%s: %s; retry %d/%d in %.2f s",
                    what, self._describe(err), attempt + 1, self.max_retries, delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _params(self, request: Request) -> dict:
        params: dict = {
            "model": self.name,
            "messages": [{"role": role, "content": content} for role, content in request.messages],
            "max_completion_tokens": request.max_new_tokens,
        }
        if request.reasoning_effort is None:
            params.update(temperature=request.temperature, top_p=request.top_p)
        else:
            params["reasoning_effort"] = request.reasoning_effort
        if request.response_format is not None:
            params["response_format"] = json.loads(request.response_format)
        return params

    # -- live mode -----------------------------------------------------------------------

    async def _complete(
        self, client: openai.AsyncOpenAI, key: str, request: Request, guard: SpendingGuard | None
    ) -> tuple[Response | None, bool]:
        """(response, whether the server replied) of one claimed request, its retries claimed
        from the guard attempt by attempt; (None, False) when the guard refused a retry."""
        params = self._params(request)
        what = f"request {request.tag or key[:12]}"
        for attempt in itertools.count():
            if attempt and guard is not None and not await self._claim(guard.claim_retry, key, request):
                return None, False
            try:
                completion = await client.chat.completions.create(**params)
            except openai.APIError as err:
                if guard is not None:  # an error status was not billed; a lost connection may have been
                    await asyncio.to_thread(guard.release, key, not isinstance(err, openai.APIStatusError))
                transient = is_transient(err)
                if not transient or attempt >= self.max_retries:
                    reason = self._describe(err)
                    if transient:
                        reason = f"gave up after {attempt + 1} attempts: {reason}"
                    logger.error("%s failed: %s", what, reason)
                    return Response(key, request.tag, "", "error", error=reason, transient=transient), False
                delay = self._backoff(attempt, err)
                logger.warning("%s: %s; retry %d/%d in %.2f s", what, self._describe(err), attempt + 1, self.max_retries, delay)
                await asyncio.sleep(delay)
                continue
            return response_from_completion(key, request.tag, completion.model_dump()), True
        raise AssertionError("unreachable")

    @staticmethod
    async def _claim(claim: Callable[..., str], key: str, request: Request) -> bool:
        """Ask the guard (off the event loop: a budget locks a shared file); while it says
        WAIT, requests in flight may free room, so ask again a little later."""
        while (verdict := await asyncio.to_thread(claim, key, request)) == WAIT:
            await asyncio.sleep(claim.__self__.poll_s)  # the guard's own interval
        return verdict == OK

    def _record(self, log: RequestLog, response: Response, guard: SpendingGuard | None) -> None:
        log.append(response, self.model)
        if guard is not None:
            guard.charge(response)

    async def _run_live(self, pending, log, guard, bar) -> dict[str, Response]:
        results: dict[str, Response] = {}
        queue = iter(pending.items())  # shared by the workers: each item is taken once

        async def worker(client: openai.AsyncOpenAI) -> None:
            for key, request in queue:
                if guard is not None and not await self._claim(guard.claim, key, request):
                    return
                response, replied = await self._complete(client, key, request, guard)
                if response is None:  # the guard refused a retry: unsent, and the run stops
                    return
                # fsync (and the budget's ledger) off the event loop, so the other requests keep flowing
                await asyncio.to_thread(self._record, log, response, guard if replied else None)
                results[key] = response
                bar.update()

        async with self._client() as client:
            workers = min(self.max_concurrency, len(pending))
            await asyncio.gather(*(worker(client) for _ in range(workers)))
        return results

    # -- batch mode ----------------------------------------------------------------------

    @staticmethod
    def _sidecar(log: RequestLog) -> Path:
        return Path(f"{log.path}.batches.json")

    def _save_batches(self, log: RequestLog, batches: list[dict]) -> None:
        path = self._sidecar(log)
        if not batches:
            path.unlink(missing_ok=True)
            return
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"model": self.model, "batches": batches}, indent=1))

    async def _submit(self, client: openai.AsyncOpenAI, chunk: list[tuple[str, Request]]) -> dict:
        lines = [
            json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": self._params(r)})
            for key, r in chunk
        ]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        uploaded = await self._retrying(
            lambda: client.files.create(file=("requests.jsonl", data), purpose="batch"), "batch upload"
        )
        batch = await self._retrying(
            lambda: client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            ),
            "batch create",
        )
        logger.info("submitted batch %s with %d requests", batch.id, len(chunk))
        return {"id": batch.id, "input_file_id": uploaded.id, "tags": {key: r.tag for key, r in chunk}}

    async def _collect(self, client, entry: dict, log: RequestLog, guard, bar) -> tuple[dict[str, Response], int]:
        """Wait for one batch, append its answers; returns them and how many are missing."""
        delay = self.poll_first_s
        while True:
            batch = await self._retrying(lambda: client.batches.retrieve(entry["id"]), f"batch {entry['id']}")
            if batch.status in BATCH_FINAL:
                break
            counts = batch.request_counts
            bar.set_postfix_str(f"{entry['id']} {batch.status} {counts.completed if counts else '?'} done")
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.poll_cap_s)
        results: dict[str, Response] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._retrying(lambda: client.files.content(file_id), f"batch file {file_id}")
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key = item["custom_id"]
                response = self._batch_item(key, entry["tags"].get(key, ""), item)
                if response is None or key in results:
                    continue
                results[key] = response
                if log.get(key) is None:
                    self._record(log, response, guard)
                bar.update()
        missing = len(set(entry["tags"]) - set(results))
        if batch.status != "completed" or missing:
            errors = [e.message for e in (batch.errors.data or [])] if batch.errors else []
            logger.warning(
                "batch %s ended %s with %d requests unanswered %s", entry["id"], batch.status, missing, errors
            )
        return results, missing

    def _batch_item(self, key: str, tag: str, item: dict) -> Response | None:
        """The record of one Batch API output line; None for a transient failure (resubmitted next run)."""
        response = item.get("response") or {}
        status = response.get("status_code")
        body = response.get("body") or {}
        if status == 200:
            return response_from_completion(key, tag, body)
        if status is not None and (status in TRANSIENT_STATUS or status >= 500):
            return None
        error = item.get("error") or body.get("error") or {}
        return Response(key, tag, "", "error", error=self._scrub(f"http {status}: {error.get('message', error)}"))

    async def _run_batches(self, pending, log, guard, bar) -> dict[str, Response]:
        path = self._sidecar(log)
        batches: list[dict] = json.loads(path.read_text())["batches"] if path.exists() else []
        if batches:
            logger.info("resuming %d batches recorded in %s", len(batches), path)
        submitted = {key for entry in batches for key in entry["tags"]}
        todo = []
        for key, request in pending.items():
            if key in submitted:
                continue
            # A batch takes hours: no waiting for room here, a rerun submits the rest.
            if guard is not None and guard.claim(key, request, wait=False) != OK:
                break
            todo.append((key, request))
        results: dict[str, Response] = {}
        unanswered = 0
        async with self._client() as client:
            for start in range(0, len(todo), BATCH_MAX_REQUESTS):
                batches.append(await self._submit(client, todo[start : start + BATCH_MAX_REQUESTS]))
                self._save_batches(log, batches)  # before any waiting: a restart resumes it
            outcomes = await asyncio.gather(*(self._collect(client, entry, log, guard, bar) for entry in batches))
        for answers, missing in outcomes:
            results.update(answers)
            unanswered += missing
        if guard is not None:  # expired, cancelled or failed in the batch: not billed
            for key, _ in todo:
                if key not in results:
                    guard.release(key, maybe_billed=False)
        self._save_batches(log, [])
        if unanswered:
            raise CommandError(
                f"model {self.name!r}: {unanswered} batch requests ended without an answer "
                f"(expired, cancelled or transient errors); rerun to submit them again"
            )
        return {key: response for key, response in results.items() if key in pending}
