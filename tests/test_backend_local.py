"""The local backend with the embedded SmolLM2-135M (tiny prompts, short generations)."""

from __future__ import annotations

import math

import pytest
from helpers import model

from synthpert.errors import CommandError
from synthpert.llm.model import adapter_digest
from synthpert.llm.local import LocalBackend
from synthpert.llm.requests import Request, RequestLog, SpendingGuard

pytestmark = pytest.mark.slow

OPTIONS = ("banana", "cherry", "seven")


def repeat(word: str, **kwargs) -> Request:
    prompt = f"Repeat the word {word} inside answer tags: <answer>{word}</answer>"
    return Request(messages=(("user", prompt),), options=OPTIONS, tag=word, **kwargs)


def chat(text: str, max_new_tokens: int = 8, **kwargs) -> Request:
    return Request(messages=(("user", text),), max_new_tokens=max_new_tokens, tag=text, **kwargs)


@pytest.fixture(scope="module")
def backend(embedded_model):
    return LocalBackend(model(backend="local", model=str(embedded_model), batch_size=4, dtype="auto"))


@pytest.fixture
def count_generate(backend, monkeypatch):
    calls = []
    generate = backend.lm.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return generate(*args, **kwargs)

    monkeypatch.setattr(backend.lm, "generate", counting)
    return calls


def test_batched_generation_equals_one_at_a_time(backend, count_generate, tmp_path, monkeypatch):
    requests = [chat("What is the capital of France?"), chat("Hi"), chat("Name a colour, in one word only please.")]
    batched = backend.run(requests, RequestLog(tmp_path / "batched.jsonl"))
    assert len(count_generate) == 1 and count_generate[0][0] == 3  # one padded forward batch

    monkeypatch.setattr(backend, "batch_size", 1)
    single = backend.run(requests, RequestLog(tmp_path / "single.jsonl"))
    assert len(count_generate) == 4

    assert len(batched) == len(single) == 3
    for request in requests:
        a, b = batched[request.key(backend.model)], single[request.key(backend.model)]
        assert a == b  # greedy: left padding with its attention mask does not change the text
        assert a.tag == request.tag and a.text and a.prompt_tokens > 10
        assert a.finish_reason in ("stop", "length")
        if a.finish_reason == "length":
            assert a.completion_tokens == 8
        else:
            assert a.completion_tokens <= 8
    paris = batched[requests[0].key(backend.model)]
    assert "Paris" in paris.text


def test_option_scores_follow_the_prompt(backend, count_generate, tmp_path):
    requests = [repeat("banana", max_new_tokens=0), repeat("cherry", max_new_tokens=0)]
    results = backend.run(requests, RequestLog(tmp_path / "log.jsonl"))
    assert count_generate == []  # max_new_tokens=0: likelihood only, no generation
    for request in requests:
        response = results[request.key(backend.model)]
        assert (response.text, response.finish_reason, response.completion_tokens) == ("", "stop", 0)
        scores = response.option_logprobs
        assert set(scores) == set(OPTIONS) and all(math.isfinite(s) and s < 0 for s in scores.values())
        total = sum(math.exp(s) for s in scores.values())
        best = max(scores, key=scores.get)
        assert best == request.tag and math.exp(scores[best]) / total > 0.9


def test_options_are_scored_after_the_reasoning(backend):
    request = repeat("banana", max_new_tokens=0)
    prompt = backend.render(request)
    # An unclosed <think> is closed before the answer tag; anything after the tag is ignored.
    unclosed = backend._score_options(prompt, "<think>the word is banana", request)
    closed = backend._score_options(prompt, "<think>the word is banana\n</think>\n<answer>seven</answer>", request)
    assert unclosed == pytest.approx(closed)
    assert max(unclosed, key=unclosed.get) == "banana"


def test_prefill_starts_the_text(backend, tmp_path):
    request = chat("What is the capital of France?", prefill="The capital")
    response = backend.run([request], RequestLog(tmp_path / "log.jsonl"))[request.key(backend.model)]
    assert response.text.startswith("The capital") and len(response.text) > len("The capital")
    assert response.key != chat("What is the capital of France?").key(backend.model)


def test_resume_from_the_log_generates_nothing(backend, count_generate, tmp_path, monkeypatch):
    requests = [chat("Hi"), repeat("banana", max_new_tokens=0)]
    first = backend.run(requests, RequestLog(tmp_path / "log.jsonl"))
    assert len(count_generate) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was called for an answer already in the log")

    monkeypatch.setattr(backend.lm, "generate", forbidden)
    monkeypatch.setattr(type(backend.lm), "__call__", forbidden)  # the option-scoring forward pass
    again = backend.run(requests, RequestLog(tmp_path / "log.jsonl"))
    assert again == first


def test_spending_guard_stops_between_batches(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(backend, "batch_size", 1)
    guard = SpendingGuard(max_requests=1)
    results = backend.run([chat("Hi", 2), chat("Hello", 2)], RequestLog(tmp_path / "log.jsonl"), guard)
    assert len(results) == 1 and guard.exhausted


def test_lora_adapter_is_loaded(embedded_model, backend, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")

    tuned = LocalBackend(model(backend="local", model=str(embedded_model)), adapter=str(tmp_path / "adapter"))
    assert isinstance(tuned.lm, PeftModel)
    assert tuned.model == f"{backend.model}|adapter:{adapter_digest(tmp_path / 'adapter')}"  # no shared answers
    request = chat("Hi", max_new_tokens=4)
    answer = tuned.run([request], RequestLog(tmp_path / "log.jsonl"))[request.key(tuned.model)]
    # A fresh LoRA starts with B = 0: the same greedy answer as the base model.
    base_answer = backend.run([request], RequestLog(tmp_path / "base.jsonl"))[request.key(backend.model)]
    assert answer.text == base_answer.text

    with pytest.raises(CommandError, match="adapter_config.json"):
        LocalBackend(model(backend="local", model=str(embedded_model)), adapter=str(tmp_path))


def test_chat_template_file_replaces_the_tokenizer_one(embedded_model, backend, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    plain = LocalBackend(model(backend="local", model=str(embedded_model), chat_template=str(template)))
    assert plain.render(chat("Hi")) == "[user] Hi\n[assistant] "
    assert plain.model != backend.model and plain.model.split("|")[0] == backend.model.split("|")[0]
    with pytest.raises(CommandError, match="does not exist"):
        LocalBackend(model(backend="local", model=str(embedded_model), chat_template=str(tmp_path / "no.jinja")))
