"""Typed settings of each step, built in one place from the validated configuration.

Every field of a step's settings is one of two kinds:

* a *result* field can change what the step writes (a model, a prompt setting, a seed, a
  learning rate). The rule passes these as `params` (`--settings`), so Snakemake re-runs
  a job exactly when one of them changes;
* a *run* field (metadata `run=True`) only changes how the step runs: concurrency,
  retries, time-outs, batch sizes, spending caps, logging and checkpoint intervals, the
  mirror a checksummed file is fetched from. The rule passes these through a params
  function of the job's `resources` (`--run`), which Snakemake treats as derived and so
  never as a re-run trigger.

`for_step(config, step, **wildcards)` builds a step's settings from the configuration
(schema defaults already filled in by validation); the step rebuilds them from its two
JSON arguments with `from_cli`. docs/architecture.md lists what each step depends on.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthpert.core import rows
from synthpert.errors import CommandError, ConfigError

RUN = {"run": True}


def run_field(**kwargs):
    """A field that changes how a step runs, never what it writes."""
    return field(metadata=RUN, **kwargs)


class Settings:
    """Base of every settings class: splitting into result and run fields and back."""

    def params(self) -> dict:
        """The result fields, as JSON-ready values (a rule's params)."""
        return _split(self)[0]

    def run(self) -> dict:
        """The run fields, as JSON-ready values."""
        return _split(self)[1]

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)

    def run_json(self) -> str:
        return json.dumps(self.run(), sort_keys=True)

    @classmethod
    def from_cli(cls, params: dict, run: dict | None = None):
        """Rebuild the settings from `--settings` (result) and `--run` JSON objects."""
        return _build(cls, _merge(params, run or {}))


def _split(obj) -> tuple[dict, dict]:
    result, run = {}, {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Settings):
            inner_result, inner_run = _split(value)
            result[f.name] = inner_result
            if inner_run:
                run[f.name] = inner_run
        elif f.metadata.get("run"):
            run[f.name] = _plain(value)
        else:
            result[f.name] = _plain(value)
    return result, run


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls, values: dict):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING)
    if unknown or missing:
        raise CommandError(
            f"{cls.__name__} settings: unknown {unknown}, missing {missing}; expected {sorted(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(hint, type) and issubclass(hint, Settings):
            value = _build(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- pieces


@dataclass(frozen=True)
class Generation(Settings):
    max_new_tokens: int
    temperature: float
    top_p: float
    reasoning_effort: str | None

    @classmethod
    def of(cls, section: dict) -> Generation:
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})

    def request_fields(self) -> dict:
        """The `llm.requests.Request` fields these settings fill."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Sample(Settings):
    fraction: float | None
    count: int | None
    seed: int
    balanced: bool

    @classmethod
    def of(cls, section: dict) -> Sample:
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Model(Settings):
    """One `models:` entry. Backend, model, endpoint, revision, dtype and chat template
    decide its answers, and so does the content of a local model folder (`weights`, its
    digest when the workflow was planned: a folder rewritten in place re-runs what it
    answered); the rest is how answers are fetched."""

    backend: str
    model: str
    base_url: str | None
    revision: str | None
    dtype: str
    chat_template: str | None
    weights: str | None
    api_key_env: str | None = run_field()
    max_concurrency: int = run_field()
    max_retries: int = run_field()
    timeout_s: float = run_field()
    batch_api: bool = run_field()
    batch_size: int = run_field()
    structured_outputs: bool = run_field()  # a result of the critic step only
    engine: dict = run_field()  # the vllm backend's engine settings (core.config.model_entry completes them)
    price: dict | None = run_field()  # USD per million tokens (core.pricing)
    tokens_per_second: float | None = run_field()  # for the plan's GPU-hours

    @property
    def local(self) -> bool:
        """Runs in this process: the model's own option probabilities, adapters."""
        return self.backend in LOCAL_BACKENDS

    @classmethod
    def of(cls, spec: dict) -> Model:
        """The settings of a `models:` entry completed with the schema's defaults (a
        validated configuration's, or `core.config.model_entry`'s): every default lives in
        the schema, none here or in a backend."""
        names = {f.name for f in dataclasses.fields(cls)} - {"weights"}
        missing = sorted(names - set(spec))
        if missing:
            raise CommandError(f"models: entry {spec.get('model')!r} lacks {missing}: complete it with its schema defaults")
        return cls(**{k: spec[k] for k in names}, weights=_weights(spec))


LOCAL_BACKENDS = ("local", "vllm")  # in-process models: the same prompts, answers and request keys


def _weights(spec: dict) -> str | None:
    """Digest of a local model folder (None for hub ids, API models and the embedded
    model, whose folder is a rule's output and tracked by Snakemake as an input)."""
    from synthpert.core.digest import folder_digest

    if spec["backend"] == "openai" or not Path(spec["model"]).is_dir():
        return None
    return folder_digest(spec["model"])


def _model(config: dict, name: str) -> Model:
    return Model.of(config["models"][name])


DEFAULT_LEDGER = "results/budget/ledger.jsonl"


@dataclass(frozen=True)
class Budget(Settings):
    """What a paying step may spend (USD): its own cap (`<section>.budget_usd`) and the
    run's (`budget.usd`), both counted over every shard and job in the shared `ledger`
    (llm.budget). How much may be spent never changes what an answer is: run fields only."""

    step: str = run_field(default="")
    usd: float | None = run_field(default=None)
    total_usd: float | None = run_field(default=None)
    ledger: str = run_field(default=DEFAULT_LEDGER)

    @classmethod
    def of(cls, config: dict, step: str) -> Budget:
        """The budget of `step`: traces, critic or evaluate (the config section holding its cap)."""
        budget = config.get("budget", {})
        return cls(step, config[step].get("budget_usd"), budget.get("usd"), budget.get("ledger", DEFAULT_LEDGER))


def job_processes(resources: dict | None) -> int:
    """The training processes a job holds, from its Snakemake resources (set in the profile):
    `tasks` (the SLURM executor's name), else `nodes` x `tasks_per_node`, else its GPUs;
    one without any. A run setting: the same adapter comes out whatever the count."""
    resources = resources or {}
    if resources.get("tasks"):
        count = resources["tasks"]
    elif resources.get("tasks_per_node"):
        count = resources["tasks_per_node"] * (resources.get("nodes") or 1)
    else:
        count = resources.get("gpu") or 1
    if not isinstance(count, int) or count < 1:
        raise ConfigError(
            f"a training job's processes (resources tasks, tasks_per_node x nodes, or gpu) must be a positive "
            f"integer, got {count!r}"
        )
    return count


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class TraceSample(Settings):
    sample: Sample
    shards: int

    @classmethod
    def from_config(cls, config: dict, **_) -> TraceSample:
        traces = config["traces"]
        return cls(Sample.of(traces["sample"]), traces["shards"])


@dataclass(frozen=True)
class Traces(Settings):
    model: Model
    approach: str
    generation: Generation
    shards: int
    max_requests: int | None = run_field(default=None)
    max_tokens: int | None = run_field(default=None)
    budget: Budget = field(default_factory=Budget)

    @classmethod
    def from_config(cls, config: dict, **_) -> Traces:
        traces = config["traces"]
        return cls(
            _model(config, traces["model"]),
            traces["approach"],
            Generation.of(traces["generation"]),
            traces["shards"],
            traces["max_requests"],
            traces["max_tokens"],
            Budget.of(config, "traces"),
        )


@dataclass(frozen=True)
class CriticGrade(Settings):
    model: Model
    generation: Generation
    structured_outputs: bool
    budget: Budget = field(default_factory=Budget)

    @classmethod
    def from_config(cls, config: dict, **_) -> CriticGrade:
        critic = config["critic"]
        spec = config["models"][critic["model"]]
        structured = spec["backend"] == "openai" and spec["structured_outputs"]
        return cls(
            _model(config, critic["model"]), Generation.of(critic["generation"]), structured, Budget.of(config, "critic")
        )


@dataclass(frozen=True)
class CriticSelect(Settings):
    keep_grades: tuple[str, ...]
    seed: int  # of the balanced variant's downsampling
    balanced: bool

    @classmethod
    def from_config(cls, config: dict, evidence: bool = False, **_) -> CriticSelect:
        """`evidence`: the selection of the evidence traces, which has no balanced variant."""
        balanced = not evidence and "synthpert_balanced" in rows.sft_variants(config)
        return cls(tuple(config["critic"]["keep_grades"]), config["traces"]["sample"]["seed"], balanced)


@dataclass(frozen=True)
class Train(Settings):
    model: Model
    epochs: float
    max_steps: int
    learning_rate: float
    warmup_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    load_in_4bit: bool
    seed: int
    chat_template: str | None
    save_steps: int = run_field(default=500)
    logging_steps: int = run_field(default=10)
    sharding: str = run_field(default="none")
    processes: int = run_field(default=1)  # the job's (job_processes), not a config key

    @classmethod
    def from_config(cls, config: dict, resources: dict | None = None, **_) -> Train:
        train = dict(config["train"])
        model = _model(config, train.pop("model"))
        train.pop("variants")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in train.items()}
        return cls(model=model, processes=job_processes(resources), **fields)


@dataclass(frozen=True)
class Grpo(Settings):
    """GRPO after SFT: the student (its SFT adapter is an input file), the prompt sample and
    every hyper-parameter of `rl:`; checkpoint and logging intervals only change how it runs."""

    model: Model
    sample: Sample
    num_generations: int
    batch_size: int
    gradient_accumulation_steps: int
    max_steps: int
    learning_rate: float
    beta: float
    max_completion_length: int
    temperature: float
    format_weight: float
    seed: int
    save_steps: int = run_field(default=50)
    logging_steps: int = run_field(default=1)
    vllm_mode: str = run_field(default="colocate")
    processes: int = run_field(default=1)  # the job's (job_processes), not a config key

    @classmethod
    def from_config(cls, config: dict, resources: dict | None = None, rl_row: str | None = None, **_) -> Grpo:
        """The settings of the GRPO row `rl_row`: an evidence row's (GrpoEvidence) add the
        evidence settings its prompts are built with."""
        rl = dict(config["rl"])
        model, sample = _model(config, config["train"]["model"]), Sample.of(rl.pop("sample"))
        fields = dict(model=model, sample=sample, processes=job_processes(resources), **rl)
        if rl_row is not None and rows.uses_evidence(rl_row):
            return GrpoEvidence(**fields, evidence=Evidence.from_config(config))
        return cls(**fields)

    @classmethod
    def from_cli(cls, params: dict, run: dict | None = None) -> Grpo:
        kind = GrpoEvidence if "evidence" in params else Grpo
        return _build(kind, _merge(params, run or {}))


@dataclass(frozen=True)
class Questions(Settings):
    sample: Sample

    @classmethod
    def from_config(cls, config: dict, **_) -> Questions:
        return cls(Sample.of(config["evaluate"]["sample"]))


@dataclass(frozen=True)
class Predict(Settings):
    """A model row answering one shard; its adapter (trained rows) is an input file."""

    model: Model
    generation: Generation
    shards: int
    allow_failures: bool  # whether failed requests may be written (marked failed, never scored)
    budget: Budget = field(default_factory=Budget)

    @classmethod
    def from_config(cls, config: dict, row: str, **_) -> Predict:
        evaluate = config["evaluate"]
        return cls(
            _model(config, rows.row_model_name(row, config)),
            Generation.of(evaluate["generation"]),
            evaluate["shards"],
            evaluate["allow_failures"],
            Budget.of(config, "evaluate"),
        )


@dataclass(frozen=True)
class Baseline(Settings):
    knn_k: int | None  # only the knn row has a setting

    @classmethod
    def from_config(cls, config: dict, row: str, **_) -> Baseline:
        return cls(config["evaluate"]["knn_k"] if row == "knn" else None)


@dataclass(frozen=True)
class Evidence(Settings):
    """The evidence block of each question (`evidence:`): its sources and sizes, every one
    deciding the text; `k` is `evaluate.knn_k` unless set."""

    gene: bool
    pair: bool
    neighbours: bool
    k: int
    max_listed: int

    @classmethod
    def from_config(cls, config: dict, **_) -> Evidence:
        evidence = config["evidence"]
        k = evidence["k"] if evidence["k"] is not None else config["evaluate"]["knn_k"]
        return cls(evidence["gene"], evidence["pair"], evidence["neighbours"], k, evidence["max_listed"])


@dataclass(frozen=True)
class GrpoEvidence(Grpo):
    """GRPO of an evidence row (`synthpert_grpo_evidence`): each prompt holds its tuple's
    evidence block, built from the split with these settings. A separate class, so that the
    plain row's settings (and its finished jobs) are unchanged."""

    evidence: Evidence = None  # always given; a default only because Grpo's run fields have them


@dataclass(frozen=True)
class Tables(Settings):
    rows: tuple[str, ...]  # their order in the tables
    bootstrap: int | None  # resamples of the intervals of tables 3 and 4
    seed: int  # of those resamples and of the paper protocol's subsets (tables 1 and 2)

    @classmethod
    def from_config(cls, config: dict, n: str, **_) -> Tables:
        evaluate = config["evaluate"]
        bootstrap = evaluate["bootstrap"] if n in ("3", "4") else None
        return cls(tuple(evaluate["rows"]), bootstrap, evaluate["sample"]["seed"])


@dataclass(frozen=True)
class Screen(Settings):
    """A model (a `models:` name, or a model row: a trained one asks with its adapter)
    screening one perturbation."""

    model: Model
    generation: Generation
    trained: bool

    @classmethod
    def from_config(cls, config: dict, model: str, **_) -> Screen:
        name, trained = rows.model_of(model, config)
        return cls(_model(config, name), Generation.of(config["evaluate"]["generation"]), trained)


@dataclass(frozen=True)
class Derive(Settings):
    """How one cell line's own screen becomes tuples (`data.derive.<cell>`): the columns
    and layer read, the test, its correction and thresholds, the seeds. The .h5ad itself
    is the rule's input file."""

    perturbation_column: str
    control: str
    layer: str | None
    replicate_column: str | None
    pseudo_replicates: int
    method: str
    correction: str
    fdr: float
    min_cells: int
    min_mean_count: float
    test_fraction: float
    seed: int

    @classmethod
    def from_config(cls, config: dict, cell: str, **_) -> Derive:
        spec = config["data"]["derive"][cell]
        return cls(**{f.name: spec[f.name] for f in dataclasses.fields(cls)})


STEPS: dict[str, type[Settings]] = {
    "trace_sample": TraceSample,
    "traces": Traces,
    "critic_grade": CriticGrade,
    "critic_select": CriticSelect,
    "train": Train,
    "grpo": Grpo,
    "questions": Questions,
    "predict": Predict,
    "baseline": Baseline,
    "evidence": Evidence,
    "tables": Tables,
    "screen": Screen,
    "derive": Derive,
}


def for_step(config: dict, step: str, resources: dict | None = None, **wildcards: Any) -> Settings:
    """The settings of `step` (a key of `STEPS`) for one job, from the validated config,
    the job's wildcards and (run fields only: the training steps' process count) its resources."""
    return STEPS[step].from_config(config, resources=resources, **wildcards)
