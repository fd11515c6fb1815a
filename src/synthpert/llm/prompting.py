"""The text side of an in-process model, shared by the `local` and `vllm` backends (and
GRPO) so that all render and tokenise prompts alike (the tokenizer and its template come
from `llm.model.load_tokenizer`)."""

from __future__ import annotations

from synthpert.llm.requests import Request


def render(tokenizer, request: Request) -> str:
    """The prompt text the model continues (chat template + generation prompt), without prefill."""
    messages = [{"role": role, "content": content} for role, content in request.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text: the chat template already holds any BOS token."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
