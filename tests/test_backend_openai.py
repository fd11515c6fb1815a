"""The openai backend against a real local HTTP server (tests/fake_openai.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, default_answer, hang, rate_limited, rejected_key, reply, server_error

from synthpert.errors import CommandError
from synthpert.llm.backends import make_backend
from synthpert.llm.identity import api_identity
from synthpert.llm.openai_api import OpenAIBackend
from synthpert.llm.requests import Request, RequestLog, SpendingGuard, run_requests

KEY_ENV = "SYNTHPERT_TEST_OPENAI_KEY"
SENTINEL = "sk-SENTINEL-7f3a9c1e-never-write-me"
TESTS = Path(__file__).resolve().parent


def questions(n: int) -> list[Request]:
    return [Request(messages=(("system", "be brief"), ("user", f"q{i}")), max_new_tokens=32, tag=f"t{i}") for i in range(n)]


def spec_for(server: FakeOpenAI, **overrides) -> dict:
    spec = {
        "backend": "openai",
        "model": "fake-model",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "max_concurrency": 4,
        "max_retries": 3,
        "timeout_s": 5,
        "batch_api": False,
    }
    return {**spec, **overrides}


def fast_backend(spec: dict) -> OpenAIBackend:
    backend = make_backend(spec)
    backend.backoff_base_s = 0.01  # keep jittered back-off short in tests
    backend.poll_first_s = backend.poll_cap_s = 0.05
    return backend


def keys_in_file(path: Path) -> Counter:
    return Counter(json.loads(line)["key"] for line in path.read_text().splitlines())


@pytest.fixture(autouse=True)
def sentinel_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


def test_answers_are_logged_with_usage(server, tmp_path):
    log = RequestLog(tmp_path / "log.jsonl")
    requests = questions(5)
    results = fast_backend(spec_for(server)).run(requests, log)
    assert len(results) == 5
    for request in requests:
        response = results[request.key(api_identity(spec_for(server)))]
        assert response.text == default_answer(request.messages[-1][1])
        assert response.finish_reason == "stop" and response.tag == request.tag
        assert response.prompt_tokens == 3 and response.completion_tokens == 1
        assert response.option_logprobs is None
    body = server.received[0]["body"]
    assert body["max_completion_tokens"] == 32 and "max_tokens" not in body
    assert body["temperature"] == 0.0 and "reasoning_effort" not in body and "response_format" not in body
    assert server.received[0]["auth"] == f"Bearer {SENTINEL}"
    assert RequestLog(log.path).usage() == {"requests": 5, "prompt_tokens": 15, "completion_tokens": 5, "errors": 0,
                                            "transient_errors": 0, "served_models": {"fake-model": 5}}  # fmt: skip


def test_reasoning_effort_and_response_format_are_sent_only_when_set(server, tmp_path):
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    request = Request(
        messages=(("user", "q"),), reasoning_effort="low", response_format=json.dumps(schema), max_new_tokens=9
    )
    fast_backend(spec_for(server)).run([request], RequestLog(tmp_path / "log.jsonl"))
    body = server.received[0]["body"]
    assert body["reasoning_effort"] == "low" and body["response_format"] == schema
    assert "temperature" not in body and "top_p" not in body  # reasoning models reject them


def test_rate_limit_waits_for_retry_after(server, tmp_path):
    server.script("q0", rate_limited(retry_after=1.0))
    results = fast_backend(spec_for(server)).run(questions(1), RequestLog(tmp_path / "log.jsonl"))
    assert [r["question"] for r in server.received] == ["q0", "q0"]
    waited = server.received[1]["time"] - server.received[0]["time"]
    assert 1.0 <= waited < 1.8  # the server's wait, not the 10 ms jittered back-off
    assert next(iter(results.values())).finish_reason == "stop"


def test_server_errors_are_retried(server, tmp_path):
    server.script("q0", server_error(500), server_error(503))
    results = fast_backend(spec_for(server)).run(questions(1), RequestLog(tmp_path / "log.jsonl"))
    assert server.questions_received() == ["q0"] * 3
    assert next(iter(results.values())).text == default_answer("q0")


def test_hanging_request_times_out_and_is_retried(server, tmp_path):
    server.script("q0", hang(4.0))
    start = time.monotonic()
    results = fast_backend(spec_for(server, timeout_s=0.5)).run(questions(1), RequestLog(tmp_path / "log.jsonl"))
    elapsed = time.monotonic() - start
    assert server.questions_received() == ["q0", "q0"]
    assert 0.5 <= elapsed < 3.0
    assert next(iter(results.values())).finish_reason == "stop"


def test_malformed_and_truncated_answers_are_recorded_as_they_are(server, tmp_path):
    server.script("q0", reply("no tags at all"))
    server.script("q1", reply("<think>cut off", finish_reason="length"))
    requests = questions(2)
    results = fast_backend(spec_for(server)).run(requests, RequestLog(tmp_path / "log.jsonl"))
    first, second = (results[r.key(api_identity(spec_for(server)))] for r in requests)
    assert (first.text, first.finish_reason) == ("no tags at all", "stop")
    assert (second.text, second.finish_reason) == ("<think>cut off", "length")


def test_permanent_failures_are_final_and_transient_ones_asked_again(server, tmp_path):
    server.script("q0", server_error(400))  # permanent
    server.script("q1", *[server_error(500)] * 3)  # retries exhausted (max_retries 2): transient
    path = tmp_path / "log.jsonl"
    backend = fast_backend(spec_for(server, max_retries=2))
    requests = questions(3)
    results = backend.run(requests, RequestLog(path))
    bad, exhausted, fine = (results[r.key(api_identity(spec_for(server)))] for r in requests)
    assert bad.failed and not bad.transient and bad.error.startswith("http 400")
    assert exhausted.failed and exhausted.transient and exhausted.error.startswith("gave up after 3 attempts: http 500")
    assert fine.finish_reason == "stop" and not fine.failed
    assert Counter(server.questions_received()) == {"q0": 1, "q1": 3, "q2": 1}
    assert RequestLog(path).usage()["errors"] == 1 and RequestLog(path).usage()["transient_errors"] == 1

    sent = len(server.received)
    again = backend.run(requests, RequestLog(path))
    assert server.questions_received()[sent:] == ["q1"]  # only the transient failure is asked again
    assert again[requests[0].key(backend.model)] == bad
    assert again[requests[1].key(backend.model)].text == default_answer("q1")
    third = backend.run(requests, RequestLog(path))
    assert len(server.received) == sent + 1 and all(not r.failed for k, r in third.items() if k != bad.key)


def test_run_requests_stops_on_transient_failures_naming_the_log(server, tmp_path):
    server.script("q1", *[server_error(503)] * 2)
    backend = fast_backend(spec_for(server, max_retries=1))
    requests = questions(3)
    with RequestLog(tmp_path / "log.jsonl") as log, pytest.raises(CommandError) as err:
        run_requests(backend, requests, log, None, "predict teacher k562#0")
    message = str(err.value)
    assert "predict teacher k562#0: 1 of 3 requests failed" in message and str(tmp_path / "log.jsonl") in message
    assert "asks exactly the failed requests again" in message
    with RequestLog(tmp_path / "log.jsonl") as log:  # the endpoint is back
        answers = run_requests(backend, requests, log, None, "predict teacher k562#0")
    assert [a.text for a in answers] == [default_answer(f"q{i}") for i in range(3)]
    assert Counter(server.questions_received()) == {"q0": 1, "q1": 3, "q2": 1}


def test_transient_failures_logged_by_older_versions_are_asked_again(server, tmp_path):
    """Before failures had a `transient` flag, an exhausted retry was logged as a final error
    ("gave up after ..."): such lines are read as transient, a 400 stays final."""
    backend = fast_backend(spec_for(server))
    requests = questions(2)
    path = tmp_path / "log.jsonl"
    lines = [
        {"key": requests[0].key(backend.model), "tag": "t0", "text": "", "finish_reason": "error",
         "error": "gave up after 7 attempts: http 503: down", "model": backend.model, "time": 1.0},
        {"key": requests[1].key(backend.model), "tag": "t1", "text": "", "finish_reason": "error",
         "error": "http 400: bad request", "model": backend.model, "time": 1.0},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    backend.run(requests, RequestLog(path))
    assert server.questions_received() == ["q0"]


def test_served_model_is_logged_and_several_are_reported(server, tmp_path, caplog):
    backend = fast_backend(spec_for(server))
    requests = questions(4)
    served = iter(["snap-2025-01-01", "snap-2025-01-01", "snap-2025-06-01", "snap-2025-06-01"])
    server.served_model = lambda body: next(served)
    with RequestLog(tmp_path / "log.jsonl") as log, caplog.at_level("WARNING"):
        answers = run_requests(backend, requests, log, None, "predict teacher k562#0")
        usage = log.usage()
    assert sorted(a.served_model for a in answers) == ["snap-2025-01-01"] * 2 + ["snap-2025-06-01"] * 2
    assert usage["served_models"] == {"snap-2025-01-01": 2, "snap-2025-06-01": 2}
    assert "2 different served models" in caplog.text


def test_spending_guard_stops_the_run(server, tmp_path):
    guard = SpendingGuard(max_requests=3)
    results = fast_backend(spec_for(server, max_concurrency=2)).run(
        questions(10), RequestLog(tmp_path / "log.jsonl"), guard
    )
    assert len(results) == 3 and len(server.received) == 3 and guard.exhausted


def test_duplicates_are_sent_once(server, tmp_path):
    requests = questions(3) + questions(3)
    results = fast_backend(spec_for(server)).run(requests, RequestLog(tmp_path / "log.jsonl"))
    assert len(results) == 3 and sorted(server.questions_received()) == ["q0", "q1", "q2"]


def test_missing_key_fails_before_any_request(server, monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(CommandError, match=KEY_ENV):
        make_backend(spec_for(server))
    assert server.received == []


def test_key_never_reaches_the_log_or_the_messages(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # the SDK's and the HTTP client's debug logging too
    server.script("q0", rejected_key())  # the server quotes the key back in its error
    server.script("q1", server_error(500))
    path = tmp_path / "log.jsonl"
    results = fast_backend(spec_for(server)).run(questions(2), RequestLog(path))
    rejected = results[questions(1)[0].key(api_identity(spec_for(server)))]
    assert rejected.error.startswith("http 401") and "[api key]" in rejected.error
    assert SENTINEL in server.received[0]["auth"]  # it was sent ...
    assert SENTINEL not in path.read_text()  # ... but never written
    assert SENTINEL not in caplog.text
    assert "retry 1/3" in caplog.text


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_backend_openai import questions, fast_backend
from synthpert.llm.requests import RequestLog
from synthpert.llm.identity import api_identity
spec, log_path, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
fast_backend(spec).run(questions(n), RequestLog(log_path))
"""


def start_child(spec: dict, log_path: Path, n: int) -> subprocess.Popen:
    code = CHILD.format(tests=str(TESTS))
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(spec), str(log_path), str(n)],
        env={**os.environ, KEY_ENV: SENTINEL},
        stderr=subprocess.DEVNULL,
    )


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_run_resumes_without_resending_answers(tmp_path):
    n = 40
    path = tmp_path / "shard.jsonl"
    with FakeOpenAI(delay=0.1) as server:
        spec = spec_for(server, max_concurrency=3)
        child = start_child(spec, path, n)
        wait_for(lambda: line_count(path) >= 10)
        child.send_signal(signal.SIGKILL)
        child.wait()
        RequestLog(path)  # cuts a line the kill left half-written
        answered_before = set(keys_in_file(path))
        assert 10 <= len(answered_before) < n  # killed mid-shard
        sent_before = len(server.received)

        results = fast_backend(spec).run(questions(n), RequestLog(path))
        resent = server.questions_received()[sent_before:]

    by_question = {r.messages[-1][1]: r.key(api_identity(spec_for(server))) for r in questions(n)}
    assert not {by_question[q] for q in resent} & answered_before  # nothing answered was sent again
    assert len(resent) == n - len(answered_before)
    assert keys_in_file(path) == Counter({key: 1 for key in by_question.values()})  # each exactly once
    assert set(results) == set(by_question.values())


def test_batch_mode_resumes_the_submitted_batch(tmp_path):
    n = 6
    path = tmp_path / "shard.jsonl"
    sidecar = Path(f"{path}.batches.json")
    with FakeOpenAI() as server:
        spec = spec_for(server, batch_api=True)
        child = start_child(spec, path, n)
        wait_for(sidecar.exists)
        time.sleep(0.2)  # the child is polling an unfinished batch now
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert len(server.batch_creates) == 1 and not path.exists()
        batch_id = json.loads(sidecar.read_text())["batches"][0]["id"]

        server.batches_done.set()
        results = fast_backend(spec).run(questions(n), RequestLog(path))

    assert len(server.batch_creates) == 1  # picked up, not resubmitted
    assert server.batch_creates[0]["endpoint"] == "/v1/chat/completions" and batch_id == "batch-1"
    assert not sidecar.exists()
    expected = {r.key(api_identity(spec_for(server))): r for r in questions(n)}
    assert keys_in_file(path) == Counter({key: 1 for key in expected})
    for key, request in expected.items():
        assert results[key].text == default_answer(request.messages[-1][1])
        assert results[key].tag == request.tag
    assert all(r["auth"] == "batch" for r in server.received)  # no live requests were made


def test_local_only_features_are_refused_before_sending(server, tmp_path):
    backend = fast_backend(spec_for(server))
    with pytest.raises(CommandError, match="prefill"):
        backend.run([Request(messages=(("user", "q"),), prefill="<think>")], RequestLog(tmp_path / "log.jsonl"))
    with pytest.raises(CommandError, match="max_new_tokens"):
        backend.run([Request(messages=(("user", "q"),), max_new_tokens=0)], RequestLog(tmp_path / "log.jsonl"))
    assert server.received == []


def test_equal_settings_written_another_way_pay_nothing_again(server, tmp_path):
    """`temperature: 0` for `0.0`, `top_p: 1` for `1.0`, a trailing slash on the endpoint:
    the same requests, answered from the log."""
    path = tmp_path / "log.jsonl"
    messages = [(("user", f"q{i}"),) for i in range(4)]
    first = [Request(messages=m, max_new_tokens=32, temperature=0.0, top_p=1.0) for m in messages]
    fast_backend(spec_for(server)).run(first, RequestLog(path))
    sent = len(server.received)
    again = [Request(messages=m, max_new_tokens=32.0, temperature=0, top_p=1) for m in messages]
    backend = fast_backend(spec_for(server, base_url=server.base_url + "/"))
    answers = backend.run(again, RequestLog(path))
    assert len(server.received) == sent and len(answers) == 4


def test_answers_logged_under_older_key_forms_are_reused_and_relogged(server, tmp_path):
    """Before keys were canonical they hashed the numbers and the endpoint as configured:
    an answer logged so (here `temperature: 0`, an endpoint with a trailing slash) is found,
    re-logged under its canonical key, and never paid again."""
    spec = spec_for(server, base_url=server.base_url + "/")
    request = Request(messages=(("user", "q0"),), max_new_tokens=32, temperature=0, tag="t0")
    fields = {f: getattr(request, f) for f in ("messages", "max_new_tokens", "temperature", "top_p", "reasoning_effort",
                                               "response_format", "prefill", "options", "option_tag")}  # fmt: skip
    fields["temperature"] = 0  # as configured, before numbers were canonical
    old_model = f"fake-model@{server.base_url}/"
    payload = json.dumps({"model": old_model, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}},
                         sort_keys=True, ensure_ascii=False)  # fmt: skip
    old_key = hashlib.sha256(payload.encode()).hexdigest()
    path = tmp_path / "log.jsonl"
    line = {"key": old_key, "tag": "t0", "text": "<answer>paid for</answer>", "finish_reason": "stop",
            "prompt_tokens": 3, "completion_tokens": 2, "model": old_model, "time": 1.0}  # fmt: skip
    path.write_text(json.dumps(line) + "\n")
    backend = fast_backend(spec)
    answers = backend.run([request], RequestLog(path))
    assert server.received == [] and answers[request.key(backend.model)].text == "<answer>paid for</answer>"
    log = RequestLog(path)
    assert request.key(backend.model) in log and log.usage()["requests"] == 1  # re-logged, counted once
    backend.run([request], RequestLog(path))
    assert server.received == [] and len(path.read_text().splitlines()) == 2
