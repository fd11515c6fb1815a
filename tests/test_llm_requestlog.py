"""The chat interface's plumbing: content addresses, the request log, the spending guard."""

from __future__ import annotations

import json

import pytest

from synthpert.errors import CommandError
from synthpert.llm.backends import api_key, make_backend
from synthpert.llm.requests import Request, RequestLog, Response, SpendingGuard, log_records, plan


def ask(text: str, **kwargs) -> Request:
    return Request(messages=(("user", text),), **kwargs)


def test_key_is_a_content_address():
    base = ask("q", tag="a")
    assert base.key("m") == ask("q", tag="b").key("m")  # the tag is the caller's, not content
    assert len(base.key("m")) == 64
    # lists are accepted and give the same request
    assert Request(messages=[["user", "q"]], tag="a") == base
    different = [
        base.key("other-model"),
        ask("q2").key("m"),
        ask("q", max_new_tokens=5).key("m"),
        ask("q", temperature=0.7).key("m"),
        ask("q", top_p=0.9).key("m"),
        ask("q", reasoning_effort="low").key("m"),
        ask("q", response_format='{"type": "json_object"}').key("m"),
        ask("q", prefill="<think>").key("m"),
        ask("q", options=("a", "b")).key("m"),
        ask("q", options=("a", "b"), option_tag="grade").key("m"),
        Request(messages=(("system", "s"), ("user", "q"))).key("m"),
    ]
    assert len(set(different) | {base.key("m")}) == len(different) + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"messages": ()}, "at least one message"),
        ({"messages": (("robot", "x"),)}, "role"),
        ({"messages": (("user", "x"),), "max_new_tokens": -1}, "max_new_tokens"),
        ({"messages": (("user", "x"),), "temperature": -0.1}, "temperature"),
        ({"messages": (("user", "x"),), "top_p": 0}, "top_p"),
        ({"messages": (("user", "x"),), "response_format": "{not json"}, "response_format"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Request(**kwargs)


def test_log_appends_and_reloads(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    log = RequestLog(path)
    assert log.get("k1") is None and log.usage()["requests"] == 0
    log.append(Response("k1", "t1", "hello", "stop", 10, 2), model="m")
    log.append(Response("k2", "t2", "", "error", error="http 400: bad"), model="m")
    log.append(Response("k3", "t3", "cut", "length", 5, 7, option_logprobs={"a": -0.1}), model="m")
    record = json.loads(path.read_text().splitlines()[0])
    assert record["model"] == "m" and record["time"] > 0 and record["text"] == "hello"

    again = RequestLog(path)
    assert again.get("k1") == Response("k1", "t1", "hello", "stop", 10, 2)
    assert again.get("k3").option_logprobs == {"a": -0.1}
    assert again.get("k2").finish_reason == "error"  # a final failure counts as done
    assert again.usage() == {"requests": 3, "prompt_tokens": 15, "completion_tokens": 9, "errors": 1,
                             "transient_errors": 0, "served_models": {}}  # fmt: skip
    with pytest.raises(ValueError, match="finish_reason"):
        again.append(Response("k4", "", "", "maybe"))


def test_truncated_last_line_is_dropped_and_cut_off(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RequestLog(path)
    log.append(Response("k1", "", "a", "stop"))
    log.append(Response("k2", "", "b", "stop"))
    good = path.read_bytes()
    path.write_bytes(good + b'{"key": "k3", "tag": "", "te')  # killed mid-write

    reloaded = RequestLog(path)
    assert reloaded.get("k3") is None and reloaded.get("k2").text == "b"
    assert path.read_bytes() == good  # cut back, so the next append is valid JSONL
    reloaded.append(Response("k3", "", "c", "stop"))
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k1", "k2", "k3"]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"key": "k1", "tag": "", "text": "a", "finish_reason": "stop"}\nnot json\n{"key": "k2"}\n')
    with pytest.raises(CommandError, match="line 2"):
        RequestLog(path)


def test_log_records_read_without_touching_a_log_being_written(tmp_path):
    path = tmp_path / "log.jsonl"
    with RequestLog(path) as log:
        log.append(Response("k1", "", "a", "stop"), model="m")
    with open(path, "ab") as fh:
        fh.write(b'{"key": "k2", "te')  # a job's append, half done
    before = path.read_bytes()
    records = log_records(path)
    assert [(r["key"], r["model"]) for r in records] == [("k1", "m")] and "time" in records[0]
    assert path.read_bytes() == before  # not cut: the writer is still at it
    assert log_records(tmp_path / "absent.jsonl") == []
    path.write_text('{"key": "k1"}\nnot json\n')
    with pytest.raises(CommandError, match="line 2"):
        log_records(path)


def test_last_line_wins_for_a_repeated_key(tmp_path):
    log = RequestLog(tmp_path / "log.jsonl")
    log.append(Response("k", "", "old", "stop"))
    log.append(Response("k", "", "new", "stop"))
    assert RequestLog(tmp_path / "log.jsonl").get("k").text == "new"


def test_plan_skips_logged_and_duplicate_requests(tmp_path):
    log = RequestLog(tmp_path / "log.jsonl")
    first, second = ask("one", tag="1"), ask("two", tag="2")
    log.append(Response(first.key("m"), "1", "answer", "stop"))
    done, pending = plan([first, second, ask("two", tag="2-again")], "m", log)
    assert list(done) == [first.key("m")]
    assert list(pending) == [second.key("m")] and pending[second.key("m")].tag == "2"


def test_spending_guard_limits():
    unlimited = SpendingGuard()
    assert all(unlimited.allow() for _ in range(100)) and not unlimited.exhausted

    by_requests = SpendingGuard(max_requests=2)
    assert [by_requests.allow() for _ in range(3)] == [True, True, False]
    assert by_requests.exhausted

    by_tokens = SpendingGuard(max_tokens=100)
    assert by_tokens.allow()
    by_tokens.charge(Response("k", "", "", "stop", prompt_tokens=60, completion_tokens=30))
    assert by_tokens.allow() and not by_tokens.exhausted
    by_tokens.charge(Response("k", "", "", "stop", prompt_tokens=5, completion_tokens=5))
    assert not by_tokens.allow() and by_tokens.exhausted


def test_api_key_from_named_variable(monkeypatch):
    monkeypatch.setenv("SYNTHPERT_KEY_X", "sk-secret-value")
    assert api_key({"model": "m", "api_key_env": "SYNTHPERT_KEY_X"}) == "sk-secret-value"
    assert api_key({"model": "m", "api_key_env": None}) == ""  # endpoint without authentication
    monkeypatch.setenv("SYNTHPERT_KEY_X", "  ")
    with pytest.raises(CommandError, match="SYNTHPERT_KEY_X"):
        api_key({"model": "m", "api_key_env": "SYNTHPERT_KEY_X"})
    monkeypatch.delenv("SYNTHPERT_KEY_X")
    with pytest.raises(CommandError, match="SYNTHPERT_KEY_X"):
        api_key({"model": "m", "api_key_env": "SYNTHPERT_KEY_X"})


def test_make_backend_errors(tmp_path, monkeypatch):
    with pytest.raises(CommandError, match="backend must be"):
        make_backend({"backend": "carrier-pigeon", "model": "m"})
    with pytest.raises(CommandError, match="adapter"):
        make_backend({"backend": "openai", "model": "m", "api_key_env": None}, adapter="some/adapter")
    monkeypatch.chdir(tmp_path)  # no resources/models here
    with pytest.raises(CommandError, match="embedded-model"):
        make_backend({"backend": "local", "model": "embedded:smollm2-135m-instruct"})
