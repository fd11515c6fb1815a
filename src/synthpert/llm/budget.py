"""A budget in dollars that every shard and every job of a step share, and the run's.

The ledger is one append-only JSONL file (config `budget.ledger`) on the filesystem the
jobs share. Before each *attempt* to send a request (a retry is another attempt, and may be
billed again), a job *reserves* what it can cost at most (its prompt counted as one token
per UTF-8 byte, an upper bound for OpenAI's byte BPEs, plus `max_new_tokens` at the output
price). When the reply comes back the job *settles* the reservation at what the API
reported (prompt, cached and completion tokens); an attempt that got an HTTP error
settles at $0, and one that timed out or lost its connection (the server may have done
the work) at its reserved worst case. A reservation that does not fit under a cap while
other requests are in flight says WAIT: they may settle for less and make room. Once
nothing is in flight and the next request still does not fit, the job stops. So the
settled total never exceeds a cap, and a step stops less than one request's worst-case
cost below it, however many shards run at once.

A job that is killed leaves its reservations open: its requests may have been billed.
Every reservation has its own id (its request log, key and attempt), so nothing a rerun
does replaces it; it counts as spent until the answer to its request arrives in its
request log, and `Ledger.reconcile` (run as each paying step starts) then settles it at
that answer's cost. One whose answer never arrives stays spent. So what the server can
bill stays under the cap through kills and reruns (docs/cluster.md).

Every read and write happens under an exclusive POSIX record lock (`fcntl.lockf`) on the
ledger, the kind NFS supports across hosts (docs/cluster.md says where it does not), taken
inside a process-wide thread lock: POSIX locks exclude processes, not the threads of one
(the OpenAI backend claims and settles from worker threads), and closing any descriptor of
the file drops every lock the process holds on it. A reservation counts as in flight while
its process lives (same host: the pid with its start time) or for `lease_s` (another host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from synthpert.core.pricing import Price
from synthpert.core.settings import Budget, Model
from synthpert.errors import CommandError
from synthpert.llm.requests import OK, STOP, WAIT, Request, Response, SpendingGuard, log_records, transient_record

logger = logging.getLogger(__name__)

HOST = socket.gethostname()
_THREADS = threading.Lock()  # one ledger access per process at a time; see the module docstring
FRAMING_TOKENS = 4  # per message, and once for the reply: an upper bound of OpenAI's chat format


def worst_prompt_tokens(request: Request) -> int:
    """More prompt tokens than the request can have: a byte-level BPE token holds at least
    one byte."""
    return sum(len(text.encode("utf-8")) + FRAMING_TOKENS for _, text in request.messages) + FRAMING_TOKENS


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), None where unknown:
    with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@functools.cache
def _process(pid: int) -> dict:
    """What names this process in a reservation (looked up once per process, forks included)."""
    return {"host": HOST, "pid": pid, "started": _started(pid)}


def _alive(record: dict, lease_s: float) -> bool:
    if record.get("host") == HOST:
        pid = int(record["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return record.get("started") is None or record["started"] == _started(pid)
    return time.time() - float(record.get("time", 0)) < lease_s


class Ledger:
    """The shared ledger file; see the module docstring. State is read incrementally
    (from the last offset read) under the lock, so each access costs the new lines only."""

    def __init__(self, path: str | os.PathLike, lease_s: float = 3600.0) -> None:
        self.path = Path(path)
        self.lease_s = lease_s
        self._offset = 0
        self.spent: dict[str, float] = defaultdict(float)  # settled USD by step
        self.open: dict[str, dict] = {}  # reservation id -> its record

    @contextlib.contextmanager
    def _locked(self) -> Iterator:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _THREADS, open(self.path, "a+b") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX)
            try:
                self._read_new(fh)
                yield fh
            finally:
                fh.flush()
                os.fsync(fh.fileno())
                fcntl.lockf(fh, fcntl.LOCK_UN)

    def _read_new(self, fh) -> None:
        fh.seek(self._offset)
        data = fh.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # Under the lock nobody is writing: a line without its newline is a write torn by a
            # killed job. End it, so the next line starts clean; it is skipped below.
            logger.warning("%s: ending a torn last line left by a killed job", self.path)
            fh.write(b"\n")
            data += b"\n"
            end = len(data)
        for line in data[:end].splitlines():
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: skipping an unreadable line %r", self.path, line[:80])
        self._offset += end

    def _apply(self, record: dict) -> None:
        if record["op"] == "reserve":
            self.open[record["id"]] = record
        elif record["op"] == "settle":
            self.open.pop(record["id"], None)
            self.spent[record["step"]] += float(record["usd"])

    def _append(self, fh, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        fh.write(line)
        self._offset += len(line)
        self._apply(record)

    def _committed(self, step: str | None = None, skip: str = "") -> tuple[float, float, bool]:
        """(settled USD, open reservations' USD, whether any open one is in flight) of one
        step, or of all steps for None; `skip` leaves out one reservation id."""
        spent = sum(v for s, v in self.spent.items() if step is None or s == step)
        records = [r for i, r in self.open.items() if i != skip and (step is None or r["step"] == step)]
        return spent, sum(float(r["usd"]) for r in records), any(_alive(r, self.lease_s) for r in records)

    def totals(self) -> tuple[dict[str, float], dict[str, float]]:
        """(settled USD by step, USD of open reservations by step), read afresh."""
        with self._locked():
            reserved: dict[str, float] = defaultdict(float)
            for record in self.open.values():
                reserved[record["step"]] += float(record["usd"])
            return dict(self.spent), dict(reserved)

    def reserve(self, rid: str, usd: float, step: str, caps: dict[str | None, float | None], **extra) -> tuple[str, str]:
        """Reserve `usd` for `step` if it fits under every cap (`caps`: step name or None for
        all steps -> USD); returns (OK, "") or (WAIT / STOP, why)."""
        with self._locked() as fh:
            for scope, cap in caps.items():
                if cap is None:
                    continue
                spent, reserved, in_flight = self._committed(scope, skip=rid)
                if spent + reserved + usd > cap + 1e-12:
                    name = f"{scope} budget ({scope}.budget_usd)" if scope else "run's budget (budget.usd)"
                    why = (
                        f"the {name} of ${cap:.4f} is spent down to ${cap - spent - reserved:.4f} "
                        f"(${spent:.4f} paid, ${reserved:.4f} reserved by requests in flight or by killed jobs), "
                        f"and the next request may cost up to ${usd:.4f}"
                    )
                    return (WAIT if in_flight else STOP), why
            self._append(fh, {"op": "reserve", "id": rid, "step": step, "usd": usd, **_process(os.getpid()),
                              "time": time.time(), **extra})  # fmt: skip
        return OK, ""

    def settle(self, rid: str, usd: float, step: str, **extra) -> None:
        """Close reservation `rid` with what the request cost."""
        with self._locked() as fh:
            self._append(fh, {"op": "settle", "id": rid, "step": step, "usd": usd, "time": time.time(), **extra})

    def settle_orphan(self, scope: str, key: str, usd: float, step: str, **extra) -> None:
        """Record the cost of an answer this process did not reserve (a Batch API answer
        collected by a rerun): it settles the open reservation a killed job left for the
        same request, or is added to the spent total when there is none."""
        with self._locked() as fh:
            orphans = [i for i, r in self.open.items() if r.get("scope") == scope and r.get("key") == key
                       and not _alive(r, self.lease_s)]  # fmt: skip
            rid = orphans[0] if orphans else f"{scope}#{key}#unreserved"
            self._append(fh, {"op": "settle", "id": rid, "step": step, "usd": usd, "time": time.time(), **extra})

    def reconcile(self) -> int:
        """Settle the open reservations of dead jobs whose answers have since arrived in
        their request logs, at those answers' cost; the others stay open (and spent).
        Returns how many were settled."""
        if not self.path.exists():  # nothing reserved yet (and nothing to create before a reservation)
            return 0
        with self._locked() as fh:
            orphans = [r for r in self.open.values() if "scope" in r and not _alive(r, self.lease_s)]
            settled = 0
            for scope, group in itertools.groupby(sorted(orphans, key=lambda r: r["scope"]), key=lambda r: r["scope"]):
                try:
                    replies = {r["key"]: r for r in log_records(Path(scope)) if not transient_record(r)}
                except CommandError as err:
                    logger.warning("%s: cannot reconcile the reservations of %s: %s", self.path, scope, err)
                    continue
                for record in group:
                    reply = replies.get(record.get("key"))
                    if reply is None:
                        continue
                    price = Price(**record["price"])
                    usd = price.usd(reply["prompt_tokens"], reply["completion_tokens"], reply.get("cached_tokens", 0),
                                    record.get("batch", False))  # fmt: skip
                    self._append(fh, {"op": "settle", "id": record["id"], "step": record["step"], "usd": usd,
                                      "time": time.time(), "reconciled": True})  # fmt: skip
                    settled += 1
        if settled:
            logger.info("%s: %d reservations of killed jobs settled at their answers' cost", self.path, settled)
        return settled


class BudgetGuard(SpendingGuard):
    """A `SpendingGuard` that also reserves the worst-case cost of each attempt to send a
    request in the step's ledger, and settles it at the reply's real cost."""

    def __init__(self, ledger: Ledger, step: str, caps: dict, price: Price, batch: bool, scope: str,
                 max_requests: int | None = None, max_tokens: int | None = None) -> None:  # fmt: skip
        super().__init__(max_requests, max_tokens)
        self.ledger, self.step, self.caps, self.price, self.batch, self.scope = ledger, step, caps, price, batch, scope
        self._attempts = itertools.count()
        self._open: dict[str, tuple[str, float]] = {}  # request key -> (reservation id, USD) of its attempt

    def worst_usd(self, request: Request) -> float:
        return self.price.usd(worst_prompt_tokens(request), request.max_new_tokens, batch=self.batch)

    def _reserve(self, key: str, request: Request | None, wait: bool) -> str:
        if request is None:
            raise ValueError("a budget needs the request to price it")
        with self._lock:
            if self.exhausted:
                return STOP
        usd = self.worst_usd(request)
        rid = f"{self.scope}#{key}#{os.getpid()}.{next(self._attempts)}"
        extra = {"scope": self.scope, "key": key, "price": dataclasses.asdict(self.price), "batch": self.batch}
        verdict, why = self.ledger.reserve(rid, usd, self.step, self.caps, **extra)
        if verdict == STOP and self.ledger.reconcile():  # killed jobs' answers arrived since: room again?
            verdict, why = self.ledger.reserve(rid, usd, self.step, self.caps, **extra)
        if verdict == WAIT and wait:
            return WAIT
        if verdict != OK:
            with self._lock:
                self.exhausted, self.stop_reason = True, why
            return STOP
        with self._lock:
            self._open[key] = (rid, usd)
        return OK

    def claim(self, key: str = "", request: Request | None = None, wait: bool = True) -> str:
        verdict = self._reserve(key, request, wait)
        if verdict != OK:
            return verdict
        verdict = super().claim(key, request)
        if verdict != OK:  # the per-shard cap refused it: the reservation is not needed
            self.release(key, maybe_billed=False)
        return verdict

    def claim_retry(self, key: str, request: Request, wait: bool = True) -> str:
        return self._reserve(key, request, wait)

    def release(self, key: str, maybe_billed: bool) -> None:
        with self._lock:
            rid, usd = self._open.pop(key, (None, 0.0))
        if rid is not None:
            self.ledger.settle(rid, usd if maybe_billed else 0.0, self.step, unanswered=True)

    def charge(self, response: Response) -> None:
        super().charge(response)
        usd = self.price.usd(response.prompt_tokens, response.completion_tokens, response.cached_tokens, self.batch)
        tokens = {"prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens}
        with self._lock:
            rid, _ = self._open.pop(response.key, (None, 0.0))
        if rid is None:  # answered without a reservation of this run (a batch a killed job submitted)
            self.ledger.settle_orphan(self.scope, response.key, usd, self.step, **tokens)
        else:
            self.ledger.settle(rid, usd, self.step, **tokens)


def spending_guard(model: Model, budget: Budget, log_file: Path, max_requests: int | None = None,
                   max_tokens: int | None = None) -> SpendingGuard:  # fmt: skip
    """The guard of one job: a `BudgetGuard` when a dollar budget applies to its model (an
    API model with a price; the configuration check refuses a budget without one)."""
    caps = {budget.step: budget.usd, None: budget.total_usd}
    if model.backend != "openai" or all(cap is None for cap in caps.values()):
        return SpendingGuard(max_requests, max_tokens)
    price = Price.of(model.price)
    if price is None:
        raise CommandError(f"a budget is set for {budget.step}, but model {model.model!r} has no price")
    lease = model.timeout_s * (model.max_retries + 1)
    ledger = Ledger(budget.ledger, lease_s=lease)
    ledger.reconcile()  # killed jobs' reservations whose answers arrived since: settled at their cost
    return BudgetGuard(ledger, budget.step, caps, price, model.batch_api, str(log_file), max_requests, max_tokens)
