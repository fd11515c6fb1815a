"""The `vllm` backend: in-process vLLM (`vllm.LLM`) behind the one chat interface.

Same requests, same answers, same content addresses as the `local` backend (the model
id is `llm.identity.local_identity` of the same weights, chat template, dtype and adapter, so the
two backends share request-log lines), but every pending request of a job goes to the
engine at once (continuous batching, paged KV cache, prefix caching).

What a run does (`VLLMBackend.run(requests, log, guard, desc)`, the `Backend` contract):
  - `llm.requests.plan` drops the requests the log already answers; each remaining one is claimed
    from the spending guard (`guard.allow()`) before it is submitted; those refused are
    not sent (the run returns what it has, as `LocalBackend` does).
  - Prompts are rendered and tokenised here with the `transformers` tokenizer exactly as
    `LocalBackend` does (chat template or the spec's `chat_template`, plus `prefill`) and
    sent as token ids. Greedy when temperature is 0, else temperature + top_p (no top-k).
    With options, generation stops at `</think>` or `<option_tag>`, as in `local`.
  - Answers are written to the log the moment they are complete (the engine is stepped
    here, not through `LLM.generate`), so a killed run resumes where it stopped.
  - Option scoring (`Request.options`), the reference being `LocalBackend._score_options`:
    the context is prompt + text up to `<option_tag>` (an open `<think>` closed first) +
    `<option_tag>`; each option scores sum log P(option + `</option_tag>` tokens). Each
    option is one prompt (context + option tokens) with `prompt_logprobs=0` that *reads*
    the prefix cache (`skip_reading_prefix_cache=False`): the context's KV blocks are
    still cached from the request's own generation (or from its sibling options), so
    only the last, partial block and the option tokens are computed. vLLM leaves the
    logprobs of cached positions unset, so a score is read only where the engine says
    the option's positions were computed (`num_cached_tokens < len(context)`); otherwise
    (a context ending exactly on a cached block boundary) that option is rescored with
    the cache bypassed. Scoring prompts are submitted as soon as their generation ends,
    so they overlap with the other generations.
  - `max_new_tokens == 0` with options: nothing is generated; the options are scored right
    after the prefill (the critic's grading by likelihood).

Engine settings (keys of the model's `models:` entry; none of them enters a request key):
  `max_model_len` (default 4096), `gpu_memory_utilization` (0.9), `max_num_seqs` (256),
  `tensor_parallel_size` (1), `dtype` (auto = bfloat16 on a GPU that has it, else float32;
  it names the precision in the model id, as for `local`), `enable_prefix_caching` (true),
  `block_size`, `enforce_eager`, `seed` (0), `max_lora_rank` (64), `max_loras` (4),
  `lora` (how adapters are served, below), and on CPU `kv_cache_space` (GiB, sets
  `VLLM_CPU_KVCACHE_SPACE`, default 4) and `cpu_threads` (sets
  `VLLM_CPU_OMP_THREADS_BIND=0-(n-1)`; default: vLLM's own choice). Environment variables
  already set win over the spec.

Adapters (LoRA), `lora:`
  - `engine` (default on GPU): the base model is loaded once with `enable_lora` and each
    adapter is a `LoRARequest`; one engine answers for the base and several adapters.
  - `merge` (default on CPU): the adapter is merged into the base weights with PEFT
    (`merge_and_unload`) into a temporary folder and that folder is served; one engine
    per adapter. Used on CPU because the CPU engine with `enable_lora` was seen to crash
    on prompt logprobs in batches (bgmv_shrink, vllm-project/vllm #29955, #16668).

API
  `VLLMBackend(spec, adapter=None)` one model (base, or base + one adapter); the engine
      starts at the first `run` that has something to send (a fully logged job never
      starts it) and stops at `close()` (or when the object is garbage collected).
  `VLLMBackend.family(spec, adapters)` one backend per entry of `adapters` (`None` = the
      base model), in order, sharing one engine in `engine` mode (load the base once per
      evaluation shard, then `run` each backend in turn); in `merge` mode each adapter
      gets its own engine, started lazily, and `close()` of one backend frees its engine
      before the next starts. `llm.backends.backend_family` walks such a family.
  `backend.model` the content identity used in request keys (same as `LocalBackend`).
  `backend.startup_seconds` time the engine took to start (None before it started).

Scripts that start an engine need an `if __name__ == "__main__":` guard (vLLM starts
worker processes).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from synthpert.errors import CommandError
from synthpert.llm.backends import resolve_local_model
from synthpert.llm.identity import local_identity, resolve_dtype
from synthpert.llm.prompting import check_adapter, encode, load_tokenizer, render
from synthpert.llm.requests import Request, RequestLog, Response, SpendingGuard, plan

logger = logging.getLogger(__name__)

ENGINE_DEFAULTS = {
    "max_model_len": 4096,
    "gpu_memory_utilization": 0.9,
    "max_num_seqs": 256,
    "tensor_parallel_size": 1,
    "enable_prefix_caching": True,
    "seed": 0,
    "max_lora_rank": 64,
    "max_loras": 4,
    "kv_cache_space": 4,
}


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def lora_mode(spec: dict) -> str:
    mode = spec.get("lora", "auto")
    if mode == "auto":
        return "merge" if on_cpu() else "engine"
    if mode not in ("engine", "merge"):
        raise CommandError(f"model {spec['model']!r}: lora must be auto, engine or merge; got {mode!r}")
    return mode


def merge_adapter(base: str, adapter: str, dtype: str, revision: str | None = None) -> str:
    """Merge a PEFT adapter into its base (in `dtype`) and save the result in a temporary
    folder (the caller removes it); returns the folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tempfile.mkdtemp(prefix="synthpert-merged-")
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), revision=revision)
    merged = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base, revision=revision).save_pretrained(out)
    del lm, merged
    gc.collect()
    logger.info("merged adapter %s into %s at %s", adapter, base, out)
    return out


class Engine:
    """One `vllm.LLM`, started on first use. `weights` is what it loads (the base, or a
    merged folder made at start); `lora` whether adapters come as `LoRARequest`s."""

    def __init__(self, spec: dict, path: str, dtype: str, lora: bool = False, merge: str | None = None) -> None:
        self.spec, self.path, self.dtype, self.lora, self.merge = spec, path, dtype, lora, merge
        self.llm = None
        self.startup_seconds: float | None = None
        self._merged_dir: str | None = None
        self._lora_ids: dict[str, int] = {}

    def setting(self, name: str):
        return self.spec.get(name, ENGINE_DEFAULTS.get(name))

    def start(self):
        if self.llm is not None:
            return self.llm
        started = time.perf_counter()
        if on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(self.setting("kv_cache_space"))))
            if self.spec.get("cpu_threads"):
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{int(self.spec['cpu_threads']) - 1}")
        weights = self.path
        if self.merge is not None:
            self._merged_dir = weights = merge_adapter(self.path, self.merge, self.dtype, self.spec.get("revision"))
        from vllm import LLM

        kwargs = {
            "model": weights,
            "dtype": self.dtype,
            "max_model_len": int(self.setting("max_model_len")),
            "max_num_seqs": int(self.setting("max_num_seqs")),
            "tensor_parallel_size": int(self.setting("tensor_parallel_size")),
            "enable_prefix_caching": bool(self.setting("enable_prefix_caching")),
            "seed": int(self.setting("seed")),
            "disable_log_stats": True,
        }
        if self.merge is None and self.spec.get("revision"):
            kwargs["revision"] = self.spec["revision"]
        if not on_cpu():
            kwargs["gpu_memory_utilization"] = float(self.setting("gpu_memory_utilization"))
        for name in ("block_size", "enforce_eager"):
            if name in self.spec:
                kwargs[name] = self.spec[name]
        if self.lora:
            kwargs |= {"enable_lora": True, "max_lora_rank": int(self.setting("max_lora_rank")),
                       "max_loras": int(self.setting("max_loras"))}
        logger.info("starting vLLM for %s (%s)", self.spec["model"], {k: v for k, v in kwargs.items() if k != "model"})
        try:
            self.llm = LLM(**kwargs)
        except Exception as err:
            self._remove_merged()
            raise CommandError(f"vLLM could not start model {self.spec['model']!r}: {err}") from err
        self.startup_seconds = time.perf_counter() - started
        logger.info("vLLM engine ready in %.1f s", self.startup_seconds)
        return self.llm

    def lora_request(self, adapter: str | None):
        if adapter is None or not self.lora:
            return None
        from vllm.lora.request import LoRARequest

        number = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter{number}", number, str(adapter))

    def _remove_merged(self) -> None:
        if self._merged_dir is not None:
            shutil.rmtree(self._merged_dir, ignore_errors=True)
            self._merged_dir = None

    def close(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception as err:  # already down
                logger.debug("vLLM shutdown: %s", err)
            self.llm = None
            gc.collect()
        self._remove_merged()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass
class _Job:
    """One request in flight: its generation, then its option scores."""

    key: str
    request: Request
    prompt: str
    prompt_ids: list[int]
    text: str = ""
    finish: str = "stop"
    n_new: int = 0
    context: list[int] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)


class VLLMBackend:
    """A local model served by vLLM in this process; see the module docstring."""

    def __init__(self, spec: dict, adapter: str | None = None, engine: Engine | None = None) -> None:
        self.spec = spec
        self.path = resolve_local_model(spec["model"])
        self.adapter = None if adapter is None else str(adapter)
        check_adapter(self.adapter)
        self.dtype = resolve_dtype(spec.get("dtype", "auto"))
        self.tokenizer = load_tokenizer(spec, self.path)
        naming = (spec["model"], spec.get("revision"), str(self.tokenizer.chat_template), self.dtype, self.adapter)
        self.model = local_identity(*naming)
        self.legacy_models = (local_identity(*naming, legacy=True),)
        self.max_model_len = int(spec.get("max_model_len", ENGINE_DEFAULTS["max_model_len"]))
        eos = {self.tokenizer.eos_token_id}
        generation_config = Path(self.path) / "generation_config.json"
        if generation_config.is_file():
            import json

            value = json.loads(generation_config.read_text()).get("eos_token_id")
            eos |= set(value if isinstance(value, list) else [value])
        self.eos_ids = sorted(i for i in eos if i is not None)
        if engine is None:
            merge = self.adapter if (self.adapter is not None and lora_mode(spec) == "merge") else None
            engine = Engine(spec, self.path, self.dtype, lora=self.adapter is not None and merge is None, merge=merge)
        self.engine = engine

    @classmethod
    def family(cls, spec: dict, adapters: Iterable[str | None]) -> list[VLLMBackend]:
        """One backend per adapter (None = the base model), sharing one engine when the
        engine serves the adapters (`lora: engine`); see the module docstring."""
        adapters = [None if a is None else str(a) for a in adapters]
        if lora_mode(spec) == "merge":
            base = None
            backends = []
            for adapter in adapters:
                if adapter is None:
                    base = base or cls(spec)
                    backends.append(base)
                else:
                    backends.append(cls(spec, adapter))
            return backends
        for adapter in adapters:
            check_adapter(adapter)
        engine = Engine(spec, resolve_local_model(spec["model"]), resolve_dtype(spec.get("dtype", "auto")),
                        lora=any(a is not None for a in adapters))
        return [cls(spec, adapter, engine=engine) for adapter in adapters]

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r})"

    @property
    def startup_seconds(self) -> float | None:
        return self.engine.startup_seconds

    def close(self) -> None:
        self.engine.close()

    def render(self, request: Request) -> str:
        return render(self.tokenizer, request)

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def _scoring_suffix(self, request: Request) -> int:
        """At most how many tokens scoring the answer options adds after the generated
        text: a `</think>` closing the reasoning, the option tag, the longest option with its
        closing tag, and two for tokens that merge differently at the seams. Checked with
        the prompt before generating, so a request never fails after its generation."""
        if not request.options:
            return 0
        tag = request.option_tag
        opening = len(self._encode("\n</think>\n")) + len(self._encode(f"<{tag}>"))
        return opening + max(len(self._encode(option + f"</{tag}>")) for option in request.options) + 2

    # -- sampling parameters -------------------------------------------------------

    def _generation_params(self, request: Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sample = request.temperature > 0
        return SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=request.temperature if sample else 0.0,
            top_p=request.top_p if sample else 1.0,
            top_k=0,
            stop=["</think>", f"<{request.option_tag}>"] if request.options else None,
            include_stop_str_in_output=True,
            stop_token_ids=self.eos_ids,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    @staticmethod
    def _scoring_params(read_cache: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            flat_logprobs=True,
            detokenize=False,
            skip_reading_prefix_cache=not read_cache,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    # -- the run -------------------------------------------------------------------

    def run(
        self,
        requests: Sequence[Request],
        log: RequestLog,
        guard: SpendingGuard | None = None,
        desc: str = "requests",
    ) -> dict[str, Response]:
        done, pending = plan(requests, self.model, log, self.legacy_models)
        jobs: dict[str, _Job] = {}
        for key, request in pending.items():
            prompt = self.render(request)
            ids = self._encode(prompt + request.prefill)
            suffix = self._scoring_suffix(request)
            if len(ids) + request.max_new_tokens + suffix > self.max_model_len:
                raise CommandError(
                    f"request {request.tag or key[:12]}: {len(ids)} prompt tokens + max_new_tokens "
                    f"{request.max_new_tokens} + {suffix} tokens to score its answer options exceed "
                    f"max_model_len {self.max_model_len} of model {self.spec['model']!r}; nothing was generated. "
                    f"Raise max_model_len under engine: in its models: entry (or lower max_new_tokens)"
                )
            jobs[key] = _Job(key, request, prompt, ids)
        if guard is not None:
            jobs = dict(itertools.takewhile(lambda _: guard.allow(), jobs.items()))
        if not jobs:
            return done
        llm = self.engine.start()
        engine = llm.llm_engine
        lora = self.engine.lora_request(self.adapter)
        generation_params = {}
        read_cached, bypass_cache = self._scoring_params(True), self._scoring_params(False)
        in_flight: set[str] = set()

        def submit(request_id: str, ids: list[int], params) -> None:
            engine.add_request(request_id, {"prompt_token_ids": ids}, params, lora_request=lora)
            in_flight.add(request_id)

        def score(job: _Job) -> None:
            """Submit one scoring prompt per option, or finish the job if it has none."""
            request = job.request
            if not request.options:
                finish(job)
                return
            tag = request.option_tag
            head = (request.prefill + job.text).split(f"<{tag}>")[0]
            if "<think>" in head and "</think>" not in head:
                head += "\n</think>\n"
            job.context = self._encode(job.prompt + head + f"<{tag}>")
            job.continuations = [self._encode(option + f"</{tag}>") for option in request.options]
            if len(job.context) + max(map(len, job.continuations)) > self.max_model_len:
                raise CommandError(f"request {request.tag or job.key[:12]}: the scoring context exceeds max_model_len")
            for i, cont in enumerate(job.continuations):
                submit(f"s|{job.key}|{i}", job.context + cont, read_cached)

        def finish(job: _Job) -> None:
            scores = None
            if job.request.options:
                scores = {option: job.scores[i] for i, option in enumerate(job.request.options)}
            response = Response(job.key, job.request.tag, job.request.prefill + job.text, job.finish,
                                len(job.prompt_ids), job.n_new, scores)
            log.append(response, self.model)
            if guard is not None:
                guard.charge(response)
            done[job.key] = response
            bar.update()
            del jobs[job.key]

        generated_tokens = 0
        started = time.perf_counter()
        bar = tqdm(total=len(jobs), desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)
        try:
            for job in list(jobs.values()):
                if job.request.max_new_tokens == 0:
                    score(job)  # likelihood only: score right after the prefill
                    continue
                settings = (job.request.max_new_tokens, job.request.temperature, job.request.top_p, job.request.options != ())
                if settings not in generation_params:
                    generation_params[settings] = self._generation_params(job.request)
                submit(f"g|{job.key}", job.prompt_ids, generation_params[settings])
            while in_flight:
                for output in engine.step():
                    if not output.finished:
                        continue
                    in_flight.discard(output.request_id)
                    kind, key, *rest = output.request_id.split("|")
                    job = jobs[key]
                    if kind == "g":
                        job.text, job.finish, job.n_new = self._read_generation(output.outputs[0], job.request)
                        generated_tokens += len(output.outputs[0].token_ids)
                        bar.set_postfix_str(f"{generated_tokens / (time.perf_counter() - started):.0f} gen tok/s")
                        score(job)
                        continue
                    i = int(rest[0])
                    value = self._read_score(output, job.context, job.continuations[i])
                    if value is None:  # positions served from the cache: score again without it
                        logger.debug("rescoring %s option %d without the prefix cache", key[:12], i)
                        submit(f"r|{key}|{i}", job.context + job.continuations[i], bypass_cache)
                        continue
                    job.scores[i] = value
                    if len(job.scores) == len(job.continuations):
                        finish(job)
        finally:
            bar.close()
            if in_flight:  # interrupted: leave the (possibly shared) engine clean
                engine.abort_request(sorted(in_flight))
        return done

    def _read_generation(self, completion, request: Request) -> tuple[str, str, int]:
        """New text, finish reason and tokens generated (EOS included), post-processed as
        `LocalBackend._generate` does (decode without special tokens, cut after the first
        stop string)."""
        tokens = list(completion.token_ids)
        eos_at = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        text = self.tokenizer.decode(tokens if eos_at is None else tokens[:eos_at], skip_special_tokens=True)
        stops = ["</think>", f"<{request.option_tag}>"] if request.options else ()
        hit = min((text.find(s) + len(s) for s in stops if s in text), default=None)
        if hit is not None:
            text = text[:hit]
            return text, "stop", len(self._encode(text))
        if eos_at is not None:
            return text, "stop", eos_at + 1
        return text, "length" if completion.finish_reason == "length" else "stop", len(tokens)

    @staticmethod
    def _read_score(output, context: list[int], continuation: list[int]) -> float | None:
        """Sum of log P(continuation tokens) from the prompt logprobs, or None when the
        engine took the positions that predict them from the prefix cache (not computed)."""
        if (output.num_cached_tokens or 0) >= len(context):
            return None
        logprobs = output.prompt_logprobs
        total = 0.0
        for offset, token in enumerate(continuation):
            position = len(context) + offset
            total += _logprob_at(logprobs, position, token)
        return total


def _logprob_at(logprobs, position: int, token: int) -> float:
    """The logprob of `token` at prompt `position`, from flat or per-position logprobs."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        start, end = logprobs.start_indices[position], logprobs.end_indices[position]
        for i in range(start, end):
            if logprobs.token_ids[i] == token:
                return float(logprobs.logprobs[i])
        raise RuntimeError(f"vLLM returned no logprob for prompt token {token} at position {position}")
    return float(logprobs[position][token].logprob)

