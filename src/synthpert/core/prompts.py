"""Every prompt text of the workflow, and the parsers of what models answer.

The texts are those of the paper (SynthPert, Appendix C: C.1 the three-class system
prompt and user query, C.2 the direction-only query, the generator and critic prompts),
recovered verbatim from the authors' code (github.com/qpdcdp/SynthPert,
src/data/dataset.py and src/generate_data/create_synth_data_with_critic.py), typos
included: the student is trained and evaluated on exactly these strings, so changing a
word changes the experiment.

An answer has the form `<think>reasoning</think><answer>label</answer>` with labels
exactly as in `labels.CLASS_NAMES`; the teacher may also answer "I do not know",
which is recorded but never kept.
"""

from __future__ import annotations

import json
import re

from synthpert.core.labels import CLASS_NAMES, DOWN, NOT_DE, UP, display_cell

Messages = tuple[tuple[str, str], ...]

TASKS = ("de3", "dir")
APPROACHES = ("explain", "predict")
GRADES = ("excellent", "good", "average", "bad", "terrible")

# Paper Appendix C.1: system prompt of the three-class question (evaluation and SFT);
# the original's prompt_mode "default".
SYSTEM_PROMPT = (
    "You are an molecular and cellular biology expert analyzing gene regulation upon CRISPRi knockdown. "
    "First, provide your reasoning process within <think> </think> tags. Consider relevant pathways "
    "(e.g., cell-type specific biology, ribosome biogenesis, transcription, mitochondrial function, stress response), "
    "gene interactions, and cell-specific context. "
    "Then, choose one option from the following and place your choice within <answer> </answer> tags: "
    "'upregulated', 'downregulated', or 'not differentially expressed'."
    "Example: <think> [Your reasoning here] </think><answer> [upregulated / downregulated / not differentially expressed] </answer>"
)

# Paper Appendix C.1: the user query ({cell} is the display name, e.g. "HepG2").
USER_QUERY = (
    "Analyze the regulatory effect of knocking down the {pert} gene on the {gene} gene "
    "in a single-cell {cell} cell line using CRISPR interference."
)

# Paper Appendix C.2: the direction-only query, asked of differentially expressed
# tuples with the C.1 system prompt (the original's prompt_mode "direction_test_prompt").
DIRECTION_QUERY = (
    "It is given that the gene in question is differentially expressed either, choose one of the following options:\n"
    "1. upregulated\n"
    "2. downregulated\n"
    "Choose ONLY ONE of the options, UPREGULATED OR DOWNREGULATED, and PLACE YOUR CHOICE WITHIN <answer> </answer> TAGS.\n"
    "For this question 'not differentially expressed' is NOT an OPTION.\n"
    " " + USER_QUERY
)

_EXAMPLE_RESPONSE = (
    "\nExample of a CORRECT response:\n"
    "<think>\nKnocking down TF_A, a known activator of Target_Gene in this cell type, likely reduces its "
    "transcription. Relevant pathways include X and Y.\n</think>"
    "<answer>downregulated</answer>"
)

# Paper Appendix C, generator prompt (approach 2, "explain"): the teacher is told the
# measured outcome and writes the reasoning that leads to it (prompt_mode
# "o3_synth_data_with_ans"). {label} is the class name.
GENERATOR_EXPLAIN_SYSTEM = (
    "You are an molecular and cellular biology expert analyzing and predicting gene regulation upon CRISPRi knockdown. "
    "The regulatory effect of knocking down the {pert} gene on the {gene} gene is given to you {label}. "
    "Please provide detailed resoning for your the solution by considering the following: "
    "1. Consider relevant pathways "
    "2. (e.g., cell-type biology, ribosome biogenesis, transcription, mitochondrial function, stress response), "
    "3 .gene interactions, and cell-specific context. "
    "Then, choose one option from the following and place your choice within <answer> </answer> tags: "
    "'upregulated', 'downregulated', 'not differentially expressed', or 'I do not know'."
    "When answering provide a reasoing in regulatory effect such that you use the following template: "
    "<think> </think> <answer> [upregulated / downregulated / not differentially expressed / I do not know] </answer> "
    + _EXAMPLE_RESPONSE
)

# Generator prompt of approach 1 ("predict"): the teacher is not told the outcome
# (prompt_mode "o3_syth_data"); wrong predictions are dropped later.
GENERATOR_PREDICT_SYSTEM = (
    "You are an molecular and cellular biology expert analyzing and predicting gene regulation upon CRISPRi knockdown. "
    "Consider relevant pathways "
    "(e.g., cell-type biology, ribosome biogenesis, transcription, mitochondrial function, stress response), "
    "gene interactions, and cell-specific context. "
    "Then, choose one option from the following and place your choice within <answer> </answer> tags: "
    "'upregulated', 'downregulated', or 'not differentially expressed'."
    "When answering provide a reasoing in regulatory effect such that you use the following template: "
    " <think> </think> <answer> [upregulated / downregulated / not differentially expressed] </answer> "
    + _EXAMPLE_RESPONSE
)

# Paper Appendix C, critic prompt. The original is an indented triple-quoted string;
# the indentation (code layout, not prompt content) is removed here.
_CRITIC_SYSTEM_HEAD = (
    "You are an expert molecular and cellular biology expert acting as a critic.\n"
    "Your task is to evaluate the reasoning process of another AI model that was asked to predict gene "
    "expression changes based on a perturbation.\n"
    "Focus *only* on the quality, logical flow, and biological relevance of the provided reasoning "
    "(<think> block). Do not judge the final answer, only the steps taken to reach it.\n"
    "Is the reasoning sound? Does it mention relevant and correct biological concepts (pathways, mechanisms, "
    "functions)? Does it logically connect the perturbation to the gene in the given cell type context?\n"
)
CRITIC_SYSTEM = _CRITIC_SYSTEM_HEAD + (
    "Output your evaluation *only* in the following format chosing a single value for the evaluation:\n"
    "<reasoning> [Provide a brief justification for your evaluation here. Explain why the reasoning is "
    "excellent, good, average, bad, or terrible.] </reasoning>\n"
    "<evaluation> [excellent/good/average/bad/terrible] </evaluation>"
)
CRITIC_USER = (
    "Original User Query:\n{query}\n\n"
    "AI's Reasoning (<think> block):\n{reasoning}\n\n"
    "Critique Task:\n"
    "Evaluate the AI's reasoning based on the criteria mentioned in the system prompt. Output your evaluation "
    "and justification in the specified format (<evaluation>...</evaluation><reasoning>...</reasoning>).\n"
)
# Our variant for endpoints with structured outputs: the same criteria, the format
# line asks for the JSON object that `CRITIC_RESPONSE_FORMAT` enforces.
CRITIC_SYSTEM_JSON = _CRITIC_SYSTEM_HEAD + (
    'Output your evaluation *only* as a JSON object {"reasoning": "<a brief justification: why the reasoning '
    'is excellent, good, average, bad, or terrible>", "grade": "<one of excellent/good/average/bad/terrible>"}.'
)
CRITIC_USER_JSON = CRITIC_USER.replace(
    "in the specified format (<evaluation>...</evaluation><reasoning>...</reasoning>)", "as the specified JSON object"
)
CRITIC_RESPONSE_FORMAT = json.dumps(
    {
        "type": "json_schema",
        "json_schema": {
            "name": "critic_grade",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "reasoning": {"type": "string"},
                    "grade": {"type": "string", "enum": list(GRADES)},
                },
                "required": ["reasoning", "grade"],
                "additionalProperties": False,
            },
        },
    }
)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def user_query(cell: str, pert: str, gene: str) -> str:
    """The C.1 question about one tuple (the cell line by its display name)."""
    return USER_QUERY.format(pert=pert, gene=gene, cell=display_cell(cell))


def with_evidence(query: str, evidence: str | None) -> str:
    """A user query followed by the question's evidence block (beyond the paper,
    docs/evidence.md); the query itself, unchanged, without one."""
    return query if evidence is None else f"{query}\n\n{evidence}"


def question_messages(cell: str, pert: str, gene: str, task: str = "de3", evidence: str | None = None) -> Messages:
    """System + user messages of the evaluation and SFT prompt (C.1, or C.2 for `dir`).

    `evidence`, the question's block from the evidence table, follows the query (the
    evidence rows); without it the messages are the paper's, byte for byte."""
    _check("task", task, TASKS)
    if task == "de3":
        query = user_query(cell, pert, gene)
    else:
        query = DIRECTION_QUERY.format(pert=pert, gene=gene, cell=display_cell(cell))
    return (("system", SYSTEM_PROMPT), ("user", with_evidence(query, evidence)))


def generator_messages(
    cell: str, pert: str, gene: str, label: int | None = None, approach: str = "explain", evidence: str | None = None
) -> Messages:
    """Teacher prompt: `explain` states the true label (paper approach 2), `predict` does not.
    `evidence` (the `synthpert_evidence` traces) follows the query, as in the student's prompt."""
    _check("approach", approach, APPROACHES)
    if approach == "explain":
        if label not in CLASS_NAMES:
            raise ValueError(f"approach 'explain' needs a label in {sorted(CLASS_NAMES)}, got {label!r}")
        system = GENERATOR_EXPLAIN_SYSTEM.format(pert=pert, gene=gene, label=CLASS_NAMES[label])
    else:
        system = GENERATOR_PREDICT_SYSTEM
    return (("system", system), ("user", with_evidence(user_query(cell, pert, gene), evidence)))


def critic_messages(
    cell: str, pert: str, gene: str, reasoning: str, output: str = "tags", evidence: str | None = None
) -> Messages:
    """Critic prompt: the question and the reasoning only, never the answer.

    `output="tags"` is the paper's `<evaluation>` format; `"json"` pairs with
    `CRITIC_RESPONSE_FORMAT` on endpoints that support structured outputs. The query holds
    the evidence block the teacher was shown, if any, so the critic judges how it was read.
    """
    _check("output", output, ("tags", "json"))
    system, user = (CRITIC_SYSTEM, CRITIC_USER) if output == "tags" else (CRITIC_SYSTEM_JSON, CRITIC_USER_JSON)
    query = with_evidence(user_query(cell, pert, gene), evidence)
    return (("system", system), ("user", user.format(query=query, reasoning=reasoning)))


def assistant_target(reasoning: str, label: int) -> str:
    """SFT target of the `synthpert` variant: the reasoning, then the true label."""
    return f"<think>{reasoning}</think><answer>{CLASS_NAMES[label]}</answer>"


def answer_only_target(label: int) -> str:
    """SFT target of the `sft_data` variant: the label alone."""
    return f"<answer>{CLASS_NAMES[label]}</answer>"


# --- parsing -----------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_OPEN_ANSWER_AT_END = re.compile(r"<answer>((?:(?!</?answer>).)*)\Z", re.IGNORECASE | re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)
_THINK_END = re.compile(r"</think>", re.IGNORECASE)
_THINK_START = re.compile(r"<think>", re.IGNORECASE)
_EVALUATION_TAG = re.compile(r"<evaluation>(.*?)</evaluation>", re.IGNORECASE | re.DOTALL)

_UNKNOWN = "unknown"  # pseudo-label of "I do not know" while parsing
# "not differentially expressed" is matched first and cut out, so that a bare
# "differentially expressed" (not a label) never reads as it, nor it as DE.
_NOT_DE = re.compile(r"\bnot\s+differentially\s+expressed\b")
_LABEL_PATTERNS = (
    (UP, re.compile(r"\bup[\s-]?regulated\b")),
    (DOWN, re.compile(r"\bdown[\s-]?regulated\b")),
    (_UNKNOWN, re.compile(r"\bi\s+(?:do\s+not|don't|dont)\s+know\b")),
)
TASK_LABELS = {"de3": (NOT_DE, DOWN, UP), "dir": (DOWN, UP)}  # the answers each question offers


def answer_options(task: str = "de3") -> tuple[str, ...]:
    """The answer texts of a task, in label order (what a local model's options are scored as)."""
    return tuple(CLASS_NAMES[c] for c in TASK_LABELS[task])
ANSWER_STATUSES = ("answered", "no_tag", "ambiguous", "truncated", "unknown", "invalid")


def _labels_in(content: str) -> set:
    text = " ".join(content.lower().replace("\u2019", "'").split())
    found = set()
    if _NOT_DE.search(text):
        found.add(NOT_DE)
        text = _NOT_DE.sub(" ", text)
    found.update(label for label, pattern in _LABEL_PATTERNS if pattern.search(text))
    return found


def outside_reasoning(text: str) -> str:
    """The text of a response outside its reasoning, where the prompt asks for the answer:
    `<think>...</think>` blocks removed, everything up to a `</think>` whose `<think>` was
    in the prompt (the prefill), and everything after a `<think>` never closed."""
    text = _THINK.sub(" ", text)
    ends = list(_THINK_END.finditer(text))
    if ends:
        text = text[ends[-1].end() :]
    start = _THINK_START.search(text)
    return text[: start.start()] if start else text


def parse_answer(text: str, finish_reason: str = "stop", task: str = "de3") -> tuple[int | None, str]:
    """Read the answer label of a response: `(pred, status)`.

    Only `<answer>` tags outside the reasoning count (`outside_reasoning`): a template
    echoed, or an answer considered, inside `<think>` is not the answer. An unclosed
    `<answer>` ending the text counts unless the generation was cut off.
    Status: `answered`; `ambiguous` (different labels tagged); `unknown` ("I do not
    know"); `invalid` (tagged text that is no label of the task, e.g. "not
    differentially expressed" in the `dir` task); `truncated` (cut off before any
    tag); `no_tag`. `pred` is a class of `labels.py` only when answered.
    """
    _check("task", task, TASKS)
    answer = outside_reasoning(text)
    contents = _ANSWER_TAG.findall(answer)
    if finish_reason != "length":
        tail = _OPEN_ANSWER_AT_END.search(answer)
        if tail and tail.group(1).strip():
            contents.append(tail.group(1))
    if not contents:
        return None, "truncated" if finish_reason == "length" else "no_tag"
    found = set().union(*(_labels_in(c) for c in contents))
    if len(found) > 1:
        return None, "ambiguous"
    if not found:
        return None, "invalid"
    (label,) = found
    if label == _UNKNOWN:
        return None, "unknown"
    if label not in TASK_LABELS[task]:
        return None, "invalid"
    return label, "answered"


def parse_reasoning(text: str) -> str | None:
    """The reasoning of a response: the `<think>` block, or what precedes `</think>`
    when the opening tag was part of the prompt; None when missing or empty."""
    match = _THINK.search(text)
    if match:
        reasoning = match.group(1)
    else:
        end = _THINK_END.search(text)
        if not end:
            return None
        reasoning = text[: end.start()]
    reasoning = reasoning.strip()
    return reasoning or None


def parse_grade(text: str) -> str | None:
    """The critic's grade from a JSON object `{"grade": ...}` or an `<evaluation>` tag;
    None unless exactly one of `GRADES` is given."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        value = None
    if isinstance(value, dict):
        candidates = [str(value.get("grade", ""))]
    else:
        candidates = _EVALUATION_TAG.findall(text)
    found = {grade for c in candidates for grade in GRADES if re.search(rf"\b{grade}\b", c.lower())}
    return found.pop() if len(found) == 1 else None
