"""Budgets in dollars: the shared ledger, and two trace shards running at once as two
processes against the fake OpenAI server (tests/fake_openai.py), stopped by one budget
and resumed when it is raised."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from fake_openai import FakeOpenAI
from helpers import demo_config, step_settings

from synthpert.core.pricing import Price
from synthpert.core.settings import Sample
from synthpert.errors import ConfigError
from synthpert.llm.budget import (
    BudgetGuard,
    Ledger,
    spending_guard,
    worst_prompt_tokens,
)
from synthpert.llm.requests import OK, STOP, WAIT, Request, RequestLog, Response, SpendingGuard
from synthpert.steps.traces import draw_sample

KEY_ENV = "SYNTHPERT_TEST_BUDGET_KEY"
REPO = Path(__file__).resolve().parents[1]
# Made-up prices, high enough that a few requests of the fake server cost cents.
PRICE = {"input": 100.0, "cached_input": 50.0, "output": 1000.0, "date": "2026-11-27", "source": "test"}


def ask(text: str, max_new_tokens: int = 100) -> Request:
    return Request(messages=(("user", text),), max_new_tokens=max_new_tokens)


# --- the ledger ------------------------------------------------------------------------


def test_reservations_fit_wait_for_requests_in_flight_then_stop(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    caps = {"traces": 1.0, None: None}
    assert ledger.reserve("a", 0.6, "traces", caps) == (OK, "")
    verdict, why = ledger.reserve("b", 0.6, "traces", caps)
    assert verdict == WAIT and "$1.0000" in why  # "a" is in flight (this process lives)
    ledger.settle("a", 0.3, "traces")
    assert ledger.reserve("b", 0.6, "traces", caps)[0] == OK  # "a" cost less than reserved
    ledger.settle("b", 0.5, "traces")
    verdict, why = ledger.reserve("c", 0.6, "traces", caps)
    assert verdict == STOP and "$0.8000 paid" in why
    # another step has its own cap; the run's cap counts every step
    assert ledger.reserve("d", 0.6, "critic", {"critic": 1.0, None: None})[0] == OK
    assert ledger.reserve("e", 0.6, "critic", {"critic": None, None: 1.0})[0] == WAIT
    # a second reader of the same file sees the same state
    other = Ledger(tmp_path / "ledger.jsonl")
    assert other.totals() == ({"traces": pytest.approx(0.8)}, {"critic": pytest.approx(0.6)})


def test_reservations_of_a_killed_job_count_as_spent_until_their_answers_arrive(tmp_path):
    log = tmp_path / "x.requests.jsonl"
    path = tmp_path / "ledger.jsonl"
    price = Price.of(PRICE)
    dead = {"op": "reserve", "id": f"{log}#k#1.0", "step": "traces", "usd": 0.9, "host": "elsewhere", "pid": 1,
            "time": 0, "scope": str(log), "key": "k", "price": dataclasses.asdict(price), "batch": False}  # fmt: skip
    path.write_text(json.dumps(dead) + "\n" + '{"op": "settle", "id": "x", "st')  # and a torn last line
    ledger = Ledger(path)
    caps = {"traces": 1.0, None: None}
    # 0.9 may have been billed and is not in flight: a rerun's reservation for the same request
    # has an id of its own and replaces nothing
    assert ledger.reserve(f"{log}#k#2.0", 0.2, "traces", caps)[0] == STOP
    assert path.read_text().count("\n") == 2  # the torn line was ended, not glued to the next one
    assert ledger.reconcile() == 0  # its answer has not arrived: still spent
    # the answer arrives in the reservation's request log: it settles at that answer's cost
    with RequestLog(log) as answers:
        answers.append(Response("k", "t", "an answer", "stop", prompt_tokens=1000, completion_tokens=100), "m")
    assert Ledger(path).reconcile() == 1
    assert Ledger(path).totals() == ({"traces": pytest.approx(price.usd(1000, 100))}, {})
    assert Ledger(path).reserve(f"{log}#k#2.0", 0.2, "traces", caps)[0] == OK


def test_every_attempt_is_reserved_and_a_failed_one_settles_by_what_it_may_have_cost(tmp_path):
    price = Price.of(PRICE)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    guard = BudgetGuard(ledger, "evaluate", {"evaluate": 10.0, None: None}, price, False, "log")
    request = ask("q", max_new_tokens=10)
    worst = guard.worst_usd(request)
    assert guard.claim("k", request) == OK
    guard.release("k", maybe_billed=False)  # an HTTP 503: not billed
    assert guard.claim_retry("k", request) == OK and ledger.totals() == ({"evaluate": 0.0}, {"evaluate": worst})
    guard.release("k", maybe_billed=True)  # a time-out: the server may have done the work
    assert guard.claim_retry("k", request) == OK
    guard.charge(Response("k", "t", "a", "stop", prompt_tokens=5, completion_tokens=2))
    assert ledger.totals() == ({"evaluate": pytest.approx(worst + price.usd(5, 2))}, {})
    assert guard.requests == 1  # retries are attempts, not more requests


def test_threads_of_one_process_take_turns_on_the_ledger(tmp_path, caplog):
    """The OpenAI backend reserves and settles from worker threads; POSIX locks do not
    exclude those, so without a thread lock they read each other's half-written lines,
    lose settlements and then wait forever on reservations that look in flight."""
    path = tmp_path / "ledger.jsonl"
    ledgers = [Ledger(path), Ledger(path)]  # two guards of one process, as in a shared job
    caps = {"traces": None, None: None}

    def work(worker: int) -> None:
        ledger = ledgers[worker % 2]
        for i in range(60):
            rid = f"{worker}#{i}"
            assert ledger.reserve(rid, 0.01, "traces", caps)[0] == OK
            ledger.settle(rid, 0.005, "traces")

    with caplog.at_level("WARNING", logger="synthpert.llm.budget"):
        threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not caplog.records, caplog.records[0].getMessage()
    assert Ledger(path).totals() == ({"traces": pytest.approx(8 * 60 * 0.005)}, {})
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_worst_case_bounds_what_the_guard_reserves(tmp_path):
    price = Price.of(PRICE)
    guard = BudgetGuard(Ledger(tmp_path / "l.jsonl"), "traces", {"traces": 1.0, None: None}, price, False, "log")
    request = ask("héllo wörld", max_new_tokens=10)
    assert worst_prompt_tokens(request) == len("héllo wörld".encode()) + 8
    assert guard.worst_usd(request) == pytest.approx((21 * 100 + 10 * 1000) / 1e6)
    batch = BudgetGuard(Ledger(tmp_path / "b.jsonl"), "traces", {"traces": 1.0, None: None}, price, True, "log")
    assert batch.worst_usd(request) == pytest.approx(guard.worst_usd(request) / 2)
    assert price.usd(1000, 100, cached_tokens=400) == pytest.approx((600 * 100 + 400 * 50 + 100 * 1000) / 1e6)


def test_steps_get_a_budget_guard_only_for_priced_api_models(tmp_path):
    paid = {"backend": "openai", "model": "o4-mini", "price": PRICE}
    config = demo_config(**{"models.teacher": paid, "models.critic": paid, "evaluate.budget_usd": 5.0, "budget.usd": 9.0})
    for step, wildcards in (("traces", {}), ("critic_grade", {}), ("predict", {"row": "teacher"})):
        settings = step_settings(step, config, **wildcards)
        guard = spending_guard(settings.model, settings.budget, tmp_path / "x.requests.jsonl")
        assert isinstance(guard, BudgetGuard), step
    assert guard.caps == {"evaluate": 5.0, None: 9.0}
    student = step_settings("predict", config, row="base")  # a local model costs no money
    assert type(spending_guard(student.model, student.budget, tmp_path / "y.jsonl")) is SpendingGuard


def test_a_budget_without_prices_is_refused_before_anything_runs():
    unpriced = {"backend": "openai", "model": "o4-mini"}
    with pytest.raises(ConfigError, match=r"critic.budget_usd is set, but model\(s\) \['critic'\].*price"):
        demo_config(**{"models.critic": unpriced, "critic.budget_usd": 1.0})
    with pytest.raises(ConfigError, match=r"budget.usd is set, but model\(s\) \['teacher'\] used by traces"):
        demo_config(**{"models.teacher": unpriced, "budget.usd": 1.0})


# --- two shards at once against the fake server ----------------------------------------


def split_table(n: int = 80) -> pl.DataFrame:
    rows = [
        {"cell": "k562", "pert": f"P{i}", "gene": f"G{i}", "de": 0, "direction": None, "label": 0, "split": "train", "role": "train"}
        for i in range(n)
    ]  # fmt: skip
    return pl.DataFrame(rows).with_columns(pl.col("label", "de").cast(pl.Int8), pl.col("direction").cast(pl.Int8))


def start_traces(work: Path, server: FakeOpenAI, budget: float, shard: int, shards: int) -> subprocess.Popen:
    """`synthpert traces run` for one shard, as its own process."""
    teacher = {"backend": "openai", "model": "fake-model", "base_url": server.base_url, "api_key_env": KEY_ENV,
               "max_concurrency": 3, "price": PRICE}  # fmt: skip
    config = demo_config(**{
        "models.teacher": teacher, "traces.shards": shards, "traces.generation": {"max_new_tokens": 64},
        "traces.budget_usd": budget, "budget.ledger": str(work / "ledger.jsonl"),
    })  # fmt: skip
    settings = step_settings("traces", config)
    env = {**os.environ, KEY_ENV: "sk-test", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "synthpert", "traces", "run", "--sample", str(work / "sample.parquet"),
         "--cell", "k562", "--shard", str(shard), "--settings", settings.params_json(), "--run", settings.run_json(),
         "--out", str(work / f"{shard}.parquet")],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_shards(work: Path, server: FakeOpenAI, budget: float) -> list[subprocess.CompletedProcess]:
    """`synthpert traces run` for shards 0 and 1, started together, as two processes."""
    procs = [start_traces(work, server, budget, shard, 2) for shard in (0, 1)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def logged(work: Path, *shards: int) -> list[dict]:
    lines = []
    for shard in shards or (0, 1):
        path = work / f"{shard}.requests.jsonl"
        lines += [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return lines


def cost(lines: list[dict]) -> float:
    price = Price.of(PRICE)
    return sum(price.usd(r["prompt_tokens"], r["completion_tokens"], r.get("cached_tokens", 0)) for r in lines)


@pytest.mark.slow
def test_two_shards_stop_together_within_one_request_of_the_cap_then_resume(tmp_path):
    sample = draw_sample(split_table(), Sample(fraction=None, count=None, seed=88, balanced=False), shards=2)
    sample.write_parquet(tmp_path / "sample.parquet")
    cap = 2.0
    with FakeOpenAI(delay=0.2) as server:  # requests overlap across the two processes
        first = run_shards(tmp_path, server, cap)
        for proc in first:
            assert proc.returncode == 1, proc.stderr[-2000:]
            assert "the spending guard stopped the run (the traces budget (traces.budget_usd) of $2.0000" in proc.stderr
            assert "missing (never sent, so unpaid)" in proc.stderr and "rerunning (with a higher limit)" in proc.stderr
        assert not list(tmp_path.glob("?.parquet")) and not list(tmp_path.glob("*.usage.json"))  # no partial output
        paid = logged(tmp_path)
        spent = Ledger(tmp_path / "ledger.jsonl").totals()[0]["traces"]
        # both shards paid for answers, at the same time
        times = [[r["time"] for r in logged(tmp_path, shard)] for shard in (0, 1)]
        assert all(times) and max(min(t) for t in times) < min(max(t) for t in times)
        assert spent == pytest.approx(cost(paid))
        # never over the cap, and stopped less than one request's worst-case cost below it
        price = Price.of(PRICE)
        worst = max(price.usd(worst_prompt_tokens(r), r.max_new_tokens) for r in requests_of(sample))
        assert cap - worst < spent <= cap
        assert len(server.received) == len(paid) < sample.height

        second = run_shards(tmp_path, server, budget=100.0)
        for proc in second:
            assert proc.returncode == 0, proc.stderr[-2000:]
        asked = Counter(r["question"] for r in server.received)
        assert len(asked) == sample.height and set(asked.values()) == {1}  # nothing paid twice
    assert pl.read_parquet(tmp_path / "0.parquet").height + pl.read_parquet(tmp_path / "1.parquet").height == sample.height
    assert Ledger(tmp_path / "ledger.jsonl").totals()[0]["traces"] == pytest.approx(cost(logged(tmp_path)))
    assert len(RequestLog(tmp_path / "0.requests.jsonl")) + len(RequestLog(tmp_path / "1.requests.jsonl")) == sample.height


def requests_of(sample: pl.DataFrame) -> list[Request]:
    from synthpert.llm.step_requests import generator_requests

    config = demo_config(**{"models.teacher": {"backend": "openai", "model": "m"}, "traces.generation": {"max_new_tokens": 64}})
    return generator_requests(sample, step_settings("traces", config))


def test_batch_api_submits_what_fits_at_half_price_and_says_why_it_stopped(tmp_path, monkeypatch):
    from synthpert.llm.backends import make_backend

    monkeypatch.setenv(KEY_ENV, "sk-test")
    requests = [ask(f"question {i}", max_new_tokens=20) for i in range(10)]
    price = Price.of(PRICE)
    worst = price.usd(worst_prompt_tokens(requests[0]), 20, batch=True)
    cap = 4.5 * worst  # four reservations fit, the fifth does not
    with FakeOpenAI() as server:
        server.batches_done.set()
        backend = make_backend({"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                                "api_key_env": KEY_ENV, "batch_api": True})  # fmt: skip
        backend.poll_first_s = backend.poll_cap_s = 0.05
        ledger = Ledger(tmp_path / "ledger.jsonl")
        guard = BudgetGuard(ledger, "evaluate", {"evaluate": cap, None: None}, price, True, "log")
        answers = backend.run(requests, RequestLog(tmp_path / "log.jsonl"), guard)
    assert len(answers) == 4 and len(server.batch_creates) == 1
    assert guard.exhausted and "the evaluate budget (evaluate.budget_usd) of" in guard.stop_reason
    paid = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    spent = sum(price.usd(r["prompt_tokens"], r["completion_tokens"], batch=True) for r in paid)
    assert ledger.totals() == ({"evaluate": pytest.approx(spent)}, {})


@pytest.mark.slow
def test_the_cap_holds_what_the_server_bills_through_kills_and_reruns(tmp_path):
    """A job killed (SIGKILL) with requests in flight, twice, then run until the budget stops
    it: every answer the server sent (billed whether or not the client lived to read it)
    was reserved in the ledger, so the server's bill never exceeds the cap."""
    sample = draw_sample(split_table(60), Sample(fraction=None, count=None, seed=88, balanced=False), shards=1)
    sample.write_parquet(tmp_path / "sample.parquet")
    cap = 1.2
    with FakeOpenAI(delay=0.4) as server:
        for kill in (1, 2):
            job = start_traces(tmp_path, server, cap, 0, 1)
            deadline = time.monotonic() + 60
            while len(server.received) < 6 * kill and time.monotonic() < deadline:  # requests in flight
                time.sleep(0.05)
            job.send_signal(signal.SIGKILL)
            job.communicate()
            assert job.returncode == -signal.SIGKILL
        last = start_traces(tmp_path, server, cap, 0, 1)
        out, err = last.communicate(timeout=180)
        billed = server.billed_usd(PRICE)
        answered = {r["question"] for r in server.billed}
    assert last.returncode == 1 and "the traces budget (traces.budget_usd) of $1.2000" in err, err[-2000:]
    assert not (tmp_path / "0.parquet").exists()
    spent, held = Ledger(tmp_path / "ledger.jsonl").totals()
    assert 0 < billed <= cap, (billed, spent, held)
    assert billed <= spent.get("traces", 0) + held.get("traces", 0) + 1e-9  # the ledger never under-counts
    # some requests were billed twice (killed in flight, asked again), none was lost
    assert len(server.billed) > len(answered) and len(RequestLog(tmp_path / "0.requests.jsonl")) == len(
        {r["key"] for r in logged(tmp_path, 0)}
    )
