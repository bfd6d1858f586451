"""A small verifiable task to watch the RL core learn without any recommendation code.

Prompt: "Sort these digits in ascending order: 3 9 1 4"; answer: "1 3 4 9".

Reward (in [0, 1]): the fraction of positions right. With `predicted` the digits found in
the completion (in order) and `target` the sorted digits,

    reward = #{i : predicted[i] == target[i]} / max(|predicted|, |target|)

so missing and extra digits both cost. Evaluation reports the mean reward and the
exact-match rate of greedy completions on held-out prompts: a validation set (which chooses
the reported checkpoint) and a test set, disjoint random draws.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.config import check

_DIGIT = re.compile(r"\d")


@dataclass
class SortTaskConfig:
    train_size: int = 5000
    eval_size: int = 128
    min_digits: int = 3
    max_digits: int = 5

    def reward_shape(self) -> str:
        """The kind of reward this task gives (a key of algorithms.base.REWARD_SHAPES)."""
        return "sequence"  # 1 for a correctly sorted answer, partial credit otherwise

    def __post_init__(self) -> None:
        check(self.train_size >= 1, "train_size", self.train_size, "must be >= 1")
        check(self.eval_size >= 1, "eval_size", self.eval_size, "must be >= 1")
        check(self.min_digits >= 1, "min_digits", self.min_digits, "must be >= 1")
        check(self.max_digits >= self.min_digits, "max_digits", self.max_digits, "must be >= min_digits")


@dataclass
class SortExample:
    digits: list[int]

    @property
    def prompt(self) -> str:
        return "Sort these digits in ascending order: " + " ".join(map(str, self.digits))

    @property
    def answer(self) -> str:
        return " ".join(map(str, sorted(self.digits)))


def sort_reward(completion: str, digits: list[int]) -> float:
    predicted = [int(d) for d in _DIGIT.findall(completion)]
    target = sorted(digits)
    correct = sum(p == t for p, t in zip(predicted, target))
    return correct / max(len(predicted), len(target))


def make_examples(count: int, min_digits: int, max_digits: int, seed: int) -> list[SortExample]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_digits, max_digits + 1, size=count)
    return [SortExample(rng.integers(0, 10, size=int(n)).tolist()) for n in lengths]


class SortTask:
    """Train, validation and test prompts for digit sorting (random draws from different seeds)."""

    selection_metric = "reward"

    def __init__(self, config: SortTaskConfig, seed: int):
        self.train = make_examples(config.train_size, config.min_digits, config.max_digits, seed)
        self.splits = {split: make_examples(config.eval_size, config.min_digits, config.max_digits, seed + offset)
                       for split, offset in (("test", 1_000_003), ("val", 2_000_003))}

    def corpus(self) -> list[str]:
        """Text to train a tokenizer on: prompts and answers."""
        return [text for example in self.train for text in (example.prompt, example.answer)]

    def demonstrations(self) -> tuple[list[list[dict]], list[str]]:
        """(chats, answers) for a supervised warm start."""
        return [[{"role": "user", "content": e.prompt}] for e in self.train], [e.answer for e in self.train]

    def num_train_prompts(self) -> int:
        return len(self.train)

    def train_messages(self, index: int) -> list[dict]:
        return [{"role": "user", "content": self.train[index].prompt}]

    def rewards(self, prompt_indices: list[int], completions: list[str], rollout=None) -> torch.Tensor:
        return torch.tensor(
            [sort_reward(text, self.train[i].digits) for i, text in zip(prompt_indices, completions)],
            dtype=torch.float32,
        )

    def evaluate(self, generate: Callable[..., list[str]], split: str = "test") -> dict[str, float]:
        examples = self.splits[split]
        completions = generate([[{"role": "user", "content": example.prompt}] for example in examples])
        rewards = [sort_reward(text, example.digits) for text, example in zip(completions, examples)]
        exact = [text.strip() == example.answer for text, example in zip(completions, examples)]
        return {"reward": float(np.mean(rewards)), "exact_match": float(np.mean(exact))}


def build_sort_task(config, data_dir: str | None) -> tuple[SortTask, list[str], str, str]:
    """(task, tokenizer corpus, data source, data fingerprint) for an experiment's config."""
    task = SortTask(config.task, config.seed)
    return task, task.corpus(), "built-in digit sorting", "sort"
