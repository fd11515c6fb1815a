"""The GRPO rewards (evaluation/rewards.py): what the evaluation's parser reads from real
completions, and why the majority class cannot win them on a class-balanced batch."""

from __future__ import annotations

import statistics

import pytest

from synthpert.core.labels import DOWN, NOT_DE, UP
from synthpert.core.prompts import parse_answer
from synthpert.evaluation.rewards import CompletionRewards, correct_reward, finish_reason, format_reward

PREFILL = "<think>\n"  # what the evaluation's local prompt already holds
EOS = 2
REASONING = "CRISPRi of HSPA8 lowers chaperone capacity; the target is a heat-shock gene in K562.\n</think>"
ANSWER = {
    NOT_DE: REASONING + "<answer>not differentially expressed</answer>",
    DOWN: REASONING + "<answer> downregulated </answer>",
    UP: REASONING + "<answer>Upregulated</answer>",
}
# Completions as a model writes them after the prefill, with the status the parser gives each.
COMPLETIONS = {
    "answered": (ANSWER[DOWN], "stop"),
    "no_tag": ("The knockdown likely leaves it downregulated.\n</think>", "stop"),
    "truncated": ("Knocking down HSPA8 in K562 cells reduces the folding capacity and the", "length"),
    "ambiguous": (REASONING + "<answer>upregulated or downregulated</answer>", "stop"),
    "unknown": (REASONING + "<answer>I do not know</answer>", "stop"),
    "no_reasoning": ("</think><answer>downregulated</answer>", "stop"),
}


@pytest.mark.parametrize("name", ["answered", "no_tag", "truncated", "ambiguous", "unknown"])
def test_the_cases_are_what_the_parser_says(name):
    text, finish = COMPLETIONS[name]
    assert parse_answer(PREFILL + text, finish)[1] == name


@pytest.mark.parametrize("label", [NOT_DE, DOWN, UP])
def test_a_correct_answer_of_each_class_earns_the_reward(label):
    for answered in (NOT_DE, DOWN, UP):
        expected = 1.0 if answered == label else 0.0
        assert correct_reward(PREFILL + ANSWER[answered], "stop", label) == expected
        assert format_reward(PREFILL + ANSWER[answered], "stop") == 1.0  # well formed, right or wrong


@pytest.mark.parametrize("name", ["no_tag", "truncated", "ambiguous", "unknown"])
def test_an_unparsed_answer_earns_nothing(name):
    text, finish = COMPLETIONS[name]
    for label in (NOT_DE, DOWN, UP):
        assert correct_reward(PREFILL + text, finish, label) == 0.0
    assert format_reward(PREFILL + text, finish) == 0.0


def test_an_answer_cut_off_inside_its_tag_is_truncated_not_answered():
    text = REASONING + "<answer>downreg"
    assert correct_reward(PREFILL + text, "length", DOWN) == 0.0
    assert correct_reward(PREFILL + REASONING + "<answer>downregulated", "stop", DOWN) == 1.0  # closed by EOS


def test_the_format_reward_wants_the_reasoning_first():
    text, finish = COMPLETIONS["no_reasoning"]
    assert correct_reward(text, finish, DOWN) == 1.0  # without the prefill: an answer, no <think> block
    assert format_reward(text, finish) == 0.0
    assert format_reward(PREFILL + ANSWER[UP], "stop") == 1.0


def test_trl_reward_functions_put_the_prefill_back_and_read_truncation_from_the_ids():
    rewards = CompletionRewards(PREFILL, {EOS})
    completions = [ANSWER[UP], ANSWER[UP], COMPLETIONS["truncated"][0], REASONING + "<answer>upregulated"]
    ids = [[5, 6, EOS], [5, 6, 7], [5, 6, 7], [5, 6, 7]]  # the second and the last ran out of tokens
    logged = {}
    correct = rewards.correct(completions, ids, label=[UP] * 4, log_metric=logged.__setitem__, trainer_state=None)
    assert correct == [1.0, 1.0, 0.0, 0.0]  # a closed tag counts even when cut after it; an open one does not
    assert rewards.well_formed(completions, ids, label=[UP] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert logged == {"correct/up": 0.5}
    assert [f.__name__ for f in rewards.functions()] == ["correct", "well_formed"]
    assert finish_reason([], {EOS}) == "length"


# --------------------------------------------------------------------------- advantages


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """GRPO's advantages as TRL computes them with `scale_rewards="none"` (the setting of
    steps/grpo.py): each reward minus the mean of its prompt's group."""
    out = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start : start + group]
        mean = statistics.fmean(chunk)
        out += [r - mean for r in chunk]
    return out


def rollout(labels: list[int], policy: list[int]) -> tuple[list[float], list[int]]:
    """Total reward of each completion of a policy answering `policy` (the same answers to
    every prompt: it does not read the question), and the answer of each."""
    rewards = CompletionRewards(PREFILL, {EOS})
    answers = [a for _ in labels for a in policy]
    completions = [ANSWER[a] for a in answers]
    ids = [[EOS]] * len(completions)
    per_label = [y for y in labels for _ in policy]
    correct = rewards.correct(completions, ids, label=per_label)
    formatted = rewards.well_formed(completions, ids)
    return [c + 0.2 * f for c, f in zip(correct, formatted)], answers


def advantage_of(answer: int, labels: list[int], policy: list[int]) -> float:
    rewards, answers = rollout(labels, policy)
    advantages = group_advantages(rewards, len(policy))
    return sum(a for a, ans in zip(advantages, answers) if ans == answer)


BALANCED = [NOT_DE, DOWN, UP] * 2
NATURAL = [NOT_DE] * 6 + [DOWN, UP]  # about the 86% "not DE" of PerturbQA


def test_a_constant_not_de_policy_gets_no_advantage_on_a_balanced_batch():
    rewards, _ = rollout(BALANCED, [NOT_DE] * 4)
    assert rewards == pytest.approx([1.2 if y == NOT_DE else 0.2 for y in BALANCED for _ in range(4)])
    assert group_advantages(rewards, 4) == [0.0] * len(rewards)


def test_answering_not_de_blindly_gains_nothing_on_a_balanced_batch_but_wins_on_the_natural_one():
    """A policy that mixes its answers without reading the question: on a class-balanced
    batch no answer gains net advantage (what "not DE" wins on its own class it loses on
    the other two), so GRPO has nothing to push; on the natural class mix "not DE" is pushed up."""
    blind = [NOT_DE, NOT_DE, DOWN, UP]
    for answer in (NOT_DE, DOWN, UP):
        assert advantage_of(answer, BALANCED, blind) == pytest.approx(0.0, abs=1e-12)
    assert advantage_of(NOT_DE, NATURAL, blind) > 0
    assert advantage_of(DOWN, NATURAL, blind) < 0


def test_a_policy_that_reads_the_question_gains_advantage_on_a_balanced_batch():
    rewards = []
    for label in BALANCED:  # answers right half of the time, "not DE" otherwise
        group, _ = rollout([label], [label, label, NOT_DE, NOT_DE])
        rewards += group
    advantages = group_advantages(rewards, 4)
    right = [a for i, a in enumerate(advantages) if i % 4 < 2 and BALANCED[i // 4] != NOT_DE]
    assert right and all(a > 0 for a in right)
