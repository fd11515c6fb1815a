"""The rewards of GRPO on PerturbQA: the evaluation's own parser reads a completion and the
measured label scores it, so the policy is rewarded for exactly what the tables count.

Two rewards, summed by GRPO with weights (1, `rl.format_weight`):

* `correct`: 1 when the parsed three-class answer is the label, else 0 (wrong, unparsed,
  ambiguous, "I do not know", truncated before its answer);
* `well_formed`: 1 when the answer parses and follows a `<think>` block, else 0.

The majority class (about 86% of tuples are "not DE") cannot win this reward: the prompts
are balanced by class, and advantages are the reward minus the group mean, unscaled
(`scale_rewards="none"`, Dr. GRPO). On a balanced batch, an answer given whatever the
prompt then gets zero net advantage: what it wins on its own class it loses on the other
two (tests/test_rewards.py; docs/grpo.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from synthpert.core.labels import CLASS_KEYS
from synthpert.core.prompts import parse_answer, parse_reasoning

TASK = "de3"  # GRPO asks the three-class question of the evaluation (paper C.1)


def correct_reward(text: str, finish_reason: str, label: int) -> float:
    """1.0 when the evaluation's parser reads `label` from the completion, else 0.0."""
    pred, status = parse_answer(text, finish_reason, TASK)
    return 1.0 if status == "answered" and pred == label else 0.0


def format_reward(text: str, finish_reason: str) -> float:
    """1.0 when the answer parses (any label) and follows a non-empty `<think>` block."""
    _, status = parse_answer(text, finish_reason, TASK)
    return 1.0 if status == "answered" and parse_reasoning(text) is not None else 0.0


def finish_reason(ids: Sequence[int], stop_ids: set[int]) -> str:
    """`stop` when the completion ended on a stop token, `length` when it ran out of tokens."""
    return "stop" if len(ids) and ids[-1] in stop_ids else "length"


class CompletionRewards:
    """The two rewards as TRL reward functions (called with the completions, their token ids
    and the dataset's `label` column). `prefill` is the text the prompt already opened the
    answer with (the evaluation's `<think>\\n`), put back before parsing as the evaluation's
    backends do; `stop_ids` are the tokens that end a completion."""

    def __init__(self, prefill: str, stop_ids: set[int]):
        self.prefill = prefill
        self.stop_ids = set(stop_ids)

    def _texts(self, completions: Sequence[str], completion_ids: Sequence[Sequence[int]]):
        return [(self.prefill + c, finish_reason(ids, self.stop_ids)) for c, ids in zip(completions, completion_ids)]

    def correct(self, completions, completion_ids, label, log_metric: Callable | None = None, **_) -> list[float]:
        rewards = [correct_reward(t, f, y) for (t, f), y in zip(self._texts(completions, completion_ids), label)]
        if log_metric is not None:  # per class: the curve that shows a majority-class policy
            by_class = defaultdict(list)
            for reward, y in zip(rewards, label):
                by_class[CLASS_KEYS[y]].append(reward)
            for key, values in by_class.items():
                log_metric(f"correct/{key}", sum(values) / len(values))
        return rewards

    def well_formed(self, completions, completion_ids, **_) -> list[float]:
        return [format_reward(t, f) for t, f in self._texts(completions, completion_ids)]

    def functions(self) -> list[Callable]:
        """The reward functions in the order of `rl` weights (correct, well_formed)."""
        return [self.correct, self.well_formed]
