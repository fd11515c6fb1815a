"""Prompt texts and the parsers of answers, reasoning and grades."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pytest
from helpers import demo_config

from synthpert.core.labels import CLASS_NAMES, DOWN, NOT_DE, UP
from synthpert.core.prompts import (
    CRITIC_RESPONSE_FORMAT,
    GRADES,
    SYSTEM_PROMPT,
    answer_only_target,
    assistant_target,
    critic_messages,
    generator_messages,
    parse_answer,
    parse_grade,
    parse_reasoning,
    question_messages,
)
from synthpert.core.settings import Generation
from synthpert.errors import CommandError
from synthpert.evaluation.answers import question_request, with_evidence


def test_question_messages_three_class_and_direction():
    (sys_role, system), (user_role, user) = question_messages("hepg2", "TP53", "MDM2")
    assert (sys_role, user_role) == ("system", "user")
    assert system == SYSTEM_PROMPT
    assert user == (
        "Analyze the regulatory effect of knocking down the TP53 gene on the MDM2 gene "
        "in a single-cell HepG2 cell line using CRISPR interference."
    )
    _, (_, direction) = question_messages("hepg2", "TP53", "MDM2", task="dir")
    assert "'not differentially expressed' is NOT an OPTION" in direction
    assert direction.endswith(user)
    with pytest.raises(ValueError, match="task"):
        question_messages("hepg2", "TP53", "MDM2", task="de")


# sha256 of both tasks' messages for one question, as the version before the evidence rows
# wrote them: a prompt without evidence must stay byte-identical (every request key with it).
PAPER_MESSAGES_SHA256 = "7efbdcf20ea72d9355d383eac6338e17baf5fc8b35c1c8c6e4643da5d178e8cd"
EVIDENCE = (
    "Evidence from the training data:\n"
    "- MDM2 in HepG2: DE after 3 of 10 knockdowns (30.0%); 2 up, 1 down."
)


def test_question_messages_without_evidence_are_the_previous_bytes():
    messages = [question_messages("hepg2", "TP53", "MDM2", task) for task in ("de3", "dir")]
    assert hashlib.sha256(json.dumps(messages).encode()).hexdigest() == PAPER_MESSAGES_SHA256
    assert [question_messages("hepg2", "TP53", "MDM2", t, evidence=None) for t in ("de3", "dir")] == messages


@pytest.mark.parametrize("task", ["de3", "dir"])
def test_evidence_follows_the_query_and_nothing_else_changes(task):
    (_, system), (_, plain) = question_messages("hepg2", "TP53", "MDM2", task)
    (_, shown_system), (_, shown) = question_messages("hepg2", "TP53", "MDM2", task, evidence=EVIDENCE)
    assert shown_system == system == SYSTEM_PROMPT
    assert shown == plain + "\n\n" + EVIDENCE


def test_requests_carry_the_evidence_only_of_rows_that_have_it():
    generation = Generation.of(demo_config()["evaluate"]["generation"])
    rows = pl.DataFrame({"qid": ["hepg2:TP53:MDM2"], "cell": ["hepg2"], "pert": ["TP53"], "gene": ["MDM2"]})
    table = pl.DataFrame({"cell": ["hepg2", "k562"], "pert": ["TP53", "TP53"], "gene": ["MDM2", "MDM2"],
                          "text": [EVIDENCE, "another cell line's block"]})  # fmt: skip
    (q,) = rows.iter_rows(named=True)
    (shown,) = with_evidence(rows, table, "test").iter_rows(named=True)
    plain, with_block = question_request(q, "de3", generation, True), question_request(shown, "de3", generation, True)
    assert plain.messages == question_messages("hepg2", "TP53", "MDM2")
    assert with_block.messages[1][1].endswith(EVIDENCE) and plain.key("m") != with_block.key("m")
    with pytest.raises(CommandError, match="1 of 1 questions have no block"):
        with_evidence(rows, table.filter(pl.col("cell") == "k562"), "test")


def test_generator_explain_states_the_label_predict_does_not():
    explain = generator_messages("k562", "A", "B", UP, "explain")
    assert "is given to you upregulated" in explain[0][1]
    assert explain[1] == question_messages("k562", "A", "B")[1]
    predict = generator_messages("k562", "A", "B", UP, "predict")
    assert "given to you" not in predict[0][1]
    assert generator_messages("k562", "A", "B", DOWN, "predict") == predict  # the label is not used
    with pytest.raises(ValueError, match="label"):
        generator_messages("k562", "A", "B", None, "explain")


@pytest.mark.parametrize("output", ["tags", "json"])
def test_critic_never_sees_the_answer(output):
    reasoning = "A activates B through the mTOR pathway."
    messages = critic_messages("rpe1", "A", "B", reasoning, output)
    text = "\n".join(content for _, content in messages)
    assert reasoning in text
    assert "single-cell RPE1 cell line" in text
    # the label names only occur in the critic's instructions, never as an outcome
    assert "is given to you" not in text
    assert "downregulated" not in text and "not differentially expressed" not in text
    assert "upregulated" not in text


def test_critic_response_format_is_a_strict_enum_of_grades():
    fmt = json.loads(CRITIC_RESPONSE_FORMAT)
    schema = fmt["json_schema"]["schema"]
    assert fmt["json_schema"]["strict"] is True
    assert schema["properties"]["grade"]["enum"] == list(GRADES)
    assert schema["required"] == ["reasoning", "grade"]


def test_targets():
    assert assistant_target("because", DOWN) == "<think>because</think><answer>downregulated</answer>"
    assert answer_only_target(NOT_DE) == "<answer>not differentially expressed</answer>"


@pytest.mark.parametrize(
    ("text", "finish", "expected"),
    [
        ("<think>r</think><answer>upregulated</answer>", "stop", (UP, "answered")),
        ("<think>r</think><answer> Downregulated </answer>", "stop", (DOWN, "answered")),
        ("<think>r</think><ANSWER>\n Not  Differentially\nExpressed.</ANSWER>", "stop", (NOT_DE, "answered")),
        ("<answer>[not differentially expressed]</answer>", "stop", (NOT_DE, "answered")),
        ("<answer>up-regulated</answer>", "stop", (UP, "answered")),
        # a bare "differentially expressed" is no label, and is not read as "not DE"
        ("<answer>differentially expressed</answer>", "stop", (None, "invalid")),
        ("<answer>maybe</answer>", "stop", (None, "invalid")),
        # several different labels
        ("<answer>upregulated</answer> or <answer>downregulated</answer>", "stop", (None, "ambiguous")),
        ("<answer>upregulated / not differentially expressed</answer>", "stop", (None, "ambiguous")),
        ("<answer>upregulated or I do not know</answer>", "stop", (None, "ambiguous")),
        # the same label twice is one answer
        ("<answer>upregulated</answer><answer>Upregulated</answer>", "stop", (UP, "answered")),
        # a template echoed inside the reasoning does not count once an answer follows </think>
        (
            "<think>format: <answer>upregulated / downregulated</answer></think><answer>downregulated</answer>",
            "stop",
            (DOWN, "answered"),
        ),
        ("<answer>I do not know</answer>", "stop", (None, "unknown")),
        ("<answer>I don't know</answer>", "stop", (None, "unknown")),
        ("the gene is upregulated", "stop", (None, "no_tag")),
        ("", "stop", (None, "no_tag")),
        ("<think>still thinking about upregulated", "length", (None, "truncated")),
        # an unclosed answer at the end counts when the model stopped, not when it was cut off
        ("<think>r</think><answer>upregulated", "stop", (UP, "answered")),
        ("<think>r</think><answer>upreg", "length", (None, "truncated")),
        # a closed answer before the cut still counts
        ("<answer>downregulated</answer> and more tex", "length", (DOWN, "answered")),
        # only the text outside the reasoning holds the answer: an answer considered inside
        # <think> is not one, whether or not a tag follows </think>
        ("<think>maybe <answer>upregulated</answer>?</think> no idea", "stop", (None, "no_tag")),
        ("<think>maybe <answer>upregulated</answer>? still thinking", "length", (None, "truncated")),
        ("<think>maybe <answer>upregulated</answer>? and stopped", "stop", (None, "no_tag")),
        ("reasoning after a prefilled <think> <answer>upregulated</answer></think>", "stop", (None, "no_tag")),
        ("prefilled reasoning</think><answer>downregulated</answer>", "stop", (DOWN, "answered")),
    ],
)
def test_parse_answer(text, finish, expected):
    assert parse_answer(text, finish) == expected


def test_parse_answer_direction_task():
    assert parse_answer("<answer>upregulated</answer>", task="dir") == (UP, "answered")
    assert parse_answer("<answer>downregulated</answer>", task="dir") == (DOWN, "answered")
    assert parse_answer("<answer>not differentially expressed</answer>", task="dir") == (None, "invalid")


def test_every_class_name_parses_to_its_class():
    for cls, name in CLASS_NAMES.items():
        assert parse_answer(assistant_target("r", cls)) == (cls, "answered")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\n  KLF1 drives HBG1.\n</think><answer>up</answer>", "KLF1 drives HBG1."),
        ("<THINK>x</THINK>", "x"),
        ("opening tag was in the prompt</think><answer>up</answer>", "opening tag was in the prompt"),
        ("<think>cut off before closing", None),
        ("<think>   </think>", None),
        ("no reasoning", None),
    ],
)
def test_parse_reasoning(text, expected):
    assert parse_reasoning(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"reasoning": "fine", "grade": "good"}', "good"),
        ('{"reasoning": "fine", "grade": "Excellent"}', "excellent"),
        ('{"grade": "superb"}', None),
        ("<reasoning>ok</reasoning>\n<evaluation> Average </evaluation>", "average"),
        ("<evaluation>[terrible]</evaluation>", "terrible"),
        ("<evaluation>[excellent/good/average/bad/terrible]</evaluation>", None),
        ("<evaluation>bad</evaluation><evaluation>bad</evaluation>", "bad"),
        ("the reasoning is good", None),
        ("[1, 2]", None),
    ],
)
def test_parse_grade(text, expected):
    assert parse_grade(text) == expected
