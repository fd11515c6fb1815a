"""The `local` backend: in-process `transformers` generation, batched.

Used for the offline demo (the embedded SmolLM2) and for the fine-tuned students (base
model + PEFT adapter). Prompts are rendered with the tokenizer's chat template (or the
spec's `chat_template` file), grouped by generation settings, sorted by length and
generated `batch_size` at a time with left padding (so every row's new tokens start at
the same column). Greedy when temperature is 0, else sampling with temperature and top_p.

Option scoring (`Request.options`): after generating, the text up to the first
`<option_tag>` (closing an unclosed `<think>` first) becomes the context, and each option
is scored as log P(option + `</option_tag>` | prompt + context + `<option_tag>`), summed
over its tokens, in one forward pass per request. With `max_new_tokens=0` nothing is
generated and the options are scored right after the prefill (grading by likelihood).

The model id in content addresses (`llm.identity.local_identity`) names the weights, the adapter
and the chat template by content, so a base model, its fine-tuned variants and a
retrained adapter never share answers.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from synthpert.errors import CommandError
from synthpert.llm.backends import resolve_local_model
from synthpert.llm.identity import local_identity, resolve_dtype
from synthpert.llm.prompting import check_adapter, encode, load_tokenizer, render
from synthpert.llm.requests import Request, RequestLog, Response, SpendingGuard, plan

logger = logging.getLogger(__name__)

class LocalBackend:
    """A causal LM in this process; see the module docstring."""

    def __init__(self, spec: dict, adapter: str | None = None) -> None:
        path = resolve_local_model(spec["model"])
        check_adapter(adapter)
        self.batch_size = int(spec.get("batch_size", 8))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = resolve_dtype(spec.get("dtype", "auto"))
        dtype = getattr(torch, dtype_name)
        self.tokenizer = load_tokenizer(spec, path)
        try:
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=spec.get("revision"))
        except OSError as err:
            raise CommandError(f"cannot load model {spec['model']!r} from {path}: {err}") from None
        naming = (spec["model"], spec.get("revision"), str(self.tokenizer.chat_template), dtype_name, adapter)
        self.model = local_identity(*naming)
        self.legacy_models = (local_identity(*naming, legacy=True),)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = lm.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        if adapter is not None:
            from peft import PeftModel

            lm = PeftModel.from_pretrained(lm, str(adapter))
        self.lm = lm.to(self.device).eval()
        logger.info("loaded %s on %s (%s)", self.model, self.device, dtype)

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.model!r}, device={self.device!r})"

    def render(self, request: Request) -> str:
        return render(self.tokenizer, request)

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def run(
        self,
        requests: Sequence[Request],
        log: RequestLog,
        guard: SpendingGuard | None = None,
        desc: str = "requests",
    ) -> dict[str, Response]:
        done, pending = plan(requests, self.model, log, self.legacy_models)
        items = []
        for key, request in pending.items():
            prompt = self.render(request)
            items.append((key, request, prompt, self._encode(prompt + request.prefill)))

        def settings(item) -> tuple:
            request = item[1]
            return request.max_new_tokens, request.temperature, request.top_p

        # Same settings in one batch; longest first inside a group (little padding, early OOM).
        items.sort(key=lambda item: (settings(item), -len(item[3])))
        with tqdm(total=len(items), desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
            for _, group in itertools.groupby(items, key=settings):
                group = list(group)
                for start in range(0, len(group), self.batch_size):
                    batch = group[start : start + self.batch_size]
                    if guard is not None:
                        batch = list(itertools.takewhile(lambda item: guard.allow(item[0], item[1]), batch))
                    for response in self._answer(batch):
                        log.append(response, self.model)
                        if guard is not None:
                            guard.charge(response)
                        done[response.key] = response
                        bar.update()
                    if guard is not None and guard.exhausted:
                        return done
        return done

    @torch.inference_mode()
    def _answer(self, batch: list[tuple[str, Request, str, list[int]]]) -> list[Response]:
        if not batch:
            return []
        request = batch[0][1]  # the batch shares its generation settings
        if request.max_new_tokens == 0:
            generated = [("", "stop", 0)] * len(batch)
        else:
            generated = self._generate([item[3] for item in batch], request)
        responses = []
        for (key, request, prompt, prompt_ids), (new_text, finish, n_new) in zip(batch, generated):
            text = request.prefill + new_text
            scores = self._score_options(prompt, text, request) if request.options else None
            responses.append(Response(key, request.tag, text, finish, len(prompt_ids), n_new, scores))
        return responses

    def _generate(self, prompts: list[list[int]], request: Request) -> list[tuple[str, str, int]]:
        """Per prompt: new text, finish reason, tokens generated (EOS included).

        With answer options, generation also stops at `</think>` or the option tag: what
        would follow is replaced by scoring the options, so those tokens are never paid for.
        """
        padded = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.device)
        sample = request.temperature > 0
        stops = ["</think>", f"<{request.option_tag}>"] if request.options else None
        config = GenerationConfig(
            max_new_tokens=request.max_new_tokens,
            do_sample=sample,
            temperature=request.temperature if sample else None,
            top_p=request.top_p if sample else None,
            top_k=0 if sample else None,  # plain nucleus sampling, no top-k cut
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=stops,
        )
        out = self.lm.generate(**padded, generation_config=config, tokenizer=self.tokenizer)
        results = []
        for row in out[:, padded["input_ids"].shape[1] :].tolist():
            stop = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
            text = self.tokenizer.decode(row if stop is None else row[:stop], skip_special_tokens=True)
            hit = min((text.find(s) + len(s) for s in stops or () if s in text), default=None)
            if hit is not None:  # stopped at a stop string (the rest of the row is padding)
                text = text[:hit]
                results.append((text, "stop", len(self._encode(text))))
            elif stop is None:
                results.append((text, "length", len(row)))
            else:
                results.append((text, "stop", stop + 1))
        return results

    @torch.inference_mode()
    def _score_options(self, prompt: str, text: str, request: Request) -> dict[str, float]:
        """log P(option + closing tag | context), summed over tokens: the shared context is
        run once and its KV cache serves every option (so scoring costs about one context
        pass, not one per option)."""
        tag = request.option_tag
        head = text.split(f"<{tag}>")[0]
        if "<think>" in head and "</think>" not in head:
            head += "\n</think>\n"
        context = self._encode(prompt + head + f"<{tag}>")
        continuations = [self._encode(option + f"</{tag}>") for option in request.options]
        out = self.lm(input_ids=torch.tensor([context], device=self.device), use_cache=True)
        first = out.logits[0, -1].float().log_softmax(-1)  # predicts each option's first token
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(continuations))
        width = max(len(c) for c in continuations) - 1
        pad = self.tokenizer.pad_token_id
        rest = torch.tensor([c[:-1] + [pad] * (width - len(c) + 1) for c in continuations], device=self.device)
        mask = torch.tensor(
            [[1] * (len(context) + len(c) - 1) + [0] * (width - len(c) + 1) for c in continuations], device=self.device
        )
        logits = self.lm(input_ids=rest, attention_mask=mask, past_key_values=cache).logits if width else None
        scores = {}
        for row, (option, cont) in enumerate(zip(request.options, continuations)):
            total = first[cont[0]]
            if len(cont) > 1:  # logits at position p of `rest` predict continuation token p + 1
                steps = logits[row, : len(cont) - 1].float().log_softmax(-1)
                total = total + steps.gather(-1, torch.tensor(cont[1:], device=self.device)[:, None]).sum()
            scores[option] = float(total)
        return scores
