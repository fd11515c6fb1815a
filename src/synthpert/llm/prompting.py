"""The text side of an in-process model, shared by the `local` and `vllm` backends so
that both load the same tokenizer and template, render and tokenise prompts alike, and
so name the same model with the same request keys."""

from __future__ import annotations

from pathlib import Path

from synthpert.errors import CommandError
from synthpert.llm.requests import Request


def check_adapter(adapter: str | None) -> None:
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise CommandError(f"adapter folder {adapter} has no adapter_config.json (not a PEFT adapter)")


def load_tokenizer(spec: dict, path: str):
    """The model's tokenizer at its revision, with the spec's `chat_template` file in place
    of its own; refused when it ends up without a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.get("revision"))
    except OSError as err:
        raise CommandError(f"cannot load the tokenizer of model {spec['model']!r} from {path}: {err}") from None
    if spec.get("chat_template"):
        template = Path(spec["chat_template"])
        if not template.is_file():
            raise CommandError(f"chat_template {template} of model {spec['model']!r} does not exist")
        tokenizer.chat_template = template.read_text()
    if not tokenizer.chat_template:
        raise CommandError(f"model {spec['model']!r} has no chat template; set chat_template to a Jinja file")
    return tokenizer


def render(tokenizer, request: Request) -> str:
    """The prompt text the model continues (chat template + generation prompt), without prefill."""
    messages = [{"role": role, "content": content} for role, content in request.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text: the chat template already holds any BOS token."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
