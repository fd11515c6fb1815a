"""The rows of the tables: which are answered by a language model, which by a trained
adapter, and which `models:` entry each model row asks."""

from __future__ import annotations

from synthpert.errors import ConfigError

BASELINE_ROWS = ("majority", "transfer", "gene_prior", "knn")  # computed without a language model
# The variants `train` can fit; `synthpert_evidence` learns from traces written with each
# tuple's evidence block, and is asked with it (docs/evidence.md).
TRAINED_ROWS = ("synthpert", "sft_data", "synthpert_balanced", "synthpert_evidence")
# Variants `grpo` fits by reinforcement learning on the labels, and the SFT row each starts from.
RL_ROWS = {"synthpert_grpo": "synthpert", "synthpert_grpo_evidence": "synthpert_evidence"}
ADAPTER_ROWS = (*TRAINED_ROWS, *RL_ROWS)  # the rows answered with a fine-tuned adapter
# Beyond the paper (docs/evidence.md): rows asked (and, if trained, trained) with each
# question's evidence block in the prompt, and the plain row whose model each asks. A
# trained evidence row answers with its own adapter.
EVIDENCE_ROWS = {
    "base_evidence": "base",
    "teacher_evidence": "teacher",
    "synthpert_evidence": "synthpert",
    "synthpert_grpo_evidence": "synthpert_grpo",
}
LLM_ROWS = ("base", *ADAPTER_ROWS, "teacher", *EVIDENCE_ROWS)
ROWS = (*BASELINE_ROWS, *LLM_ROWS)


def uses_evidence(row: str) -> bool:
    """Whether a row's prompts hold the evidence block of each question."""
    return row in EVIDENCE_ROWS


def plain_row(row: str) -> str:
    """The row whose model an evidence row asks without the evidence (itself for the others)."""
    return EVIDENCE_ROWS.get(row, row)


def row_model_name(row: str, config: dict) -> str:
    """The `models:` entry an LLM row asks: the teacher rows ask the trace model, every
    other row (base and the fine-tuned ones) the student; an evidence row asks the model
    of its plain row."""
    return config["traces"]["model"] if plain_row(row) == "teacher" else config["train"]["model"]


def model_of(name: str, config: dict) -> tuple[str, bool]:
    """What a model name asks (a screen's model, `synthpert ask --model`): the `models:`
    entry of that name, else the entry a model row asks; and whether it answers with a
    trained adapter (a fine-tuned row)."""
    if name in config["models"]:
        return name, False
    if uses_evidence(name):
        raise ConfigError(
            f"model row {name!r} is asked with each question's evidence block, which ask and screen do not show "
            f"(they ask the paper's question); ask a plain row such as {plain_row(name)!r}"
        )
    if name in LLM_ROWS:
        return row_model_name(name, config), name in ADAPTER_ROWS
    raise ConfigError(
        f"model {name!r} is neither in models: {sorted(config['models'])} nor a model row {sorted(LLM_ROWS)}"
    )


def sft_variants(config: dict) -> list[str]:
    """The SFT tables `critic select` writes from the plain traces: the plain variants
    always, the balanced one when it is trained."""
    return [
        v for v in TRAINED_ROWS
        if not uses_evidence(v) and (v != "synthpert_balanced" or v in config["train"]["variants"])
    ]  # fmt: skip


def plain_traces(config: dict) -> bool:
    """Whether the teacher writes the paper's traces: when a plain variant is trained."""
    return any(not uses_evidence(v) for v in config["train"]["variants"])


def evidence_traces(config: dict) -> bool:
    """Whether the teacher also writes traces with each tuple's evidence block: when an
    evidence variant (`synthpert_evidence`) is trained."""
    return any(uses_evidence(v) for v in config["train"]["variants"])


def trace_kinds(config: dict) -> list[bool]:
    """The traces a configuration writes, as the `evidence` flag of their paths: False for
    the paper's traces, True for the traces with evidence; neither when nothing is trained."""
    return [evidence for evidence, wanted in ((False, plain_traces(config)), (True, evidence_traces(config))) if wanted]


def engine_rows(config: dict) -> list[str]:
    """The rows one vLLM engine answers together in each evaluation shard: the student's
    base and fine-tuned rows, when the student is served by `vllm` (its base weights are
    loaded once per shard rather than once per row). Empty otherwise: one job per row.
    Evidence rows ask other prompts (and read the evidence table): one job each."""
    student = config["train"]["model"]
    if config["models"][student]["backend"] != "vllm":
        return []
    together = [
        r for r in config["evaluate"]["rows"]
        if r in LLM_ROWS and not uses_evidence(r) and row_model_name(r, config) == student
    ]  # fmt: skip
    return together if len(together) > 1 else []
