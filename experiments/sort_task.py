"""A small verifiable task to watch the RL core learn without any recommendation code.

Prompt: "Sort these digits in ascending order: 3 9 1 4"; answer: "1 3 4 9".

Reward (in [0, 1]): the fraction of positions right. With `predicted` the digits found in
the completion (in order) and `target` the sorted digits,

    reward = #{i : predicted[i] == target[i]} / max(|predicted|, |target|)

so missing and extra digits both cost. Evaluation reports the mean reward and the
exact-match rate of greedy completions on held-out prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

_DIGIT = re.compile(r"\d")


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
    """Train and eval prompts for digit sorting (disjoint random draws from different seeds)."""

    def __init__(self, train_size: int, eval_size: int, min_digits: int, max_digits: int, seed: int):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= sort_min_digits <= sort_max_digits, got {min_digits}, {max_digits}")
        self.train = make_examples(train_size, min_digits, max_digits, seed)
        self.eval = make_examples(eval_size, min_digits, max_digits, seed + 1_000_003)

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

    def rewards(self, prompt_indices: list[int], completions: list[str]) -> torch.Tensor:
        return torch.tensor(
            [sort_reward(text, self.train[i].digits) for i, text in zip(prompt_indices, completions)],
            dtype=torch.float32,
        )

    def evaluate(self, generate: Callable[[list[list[dict]]], list[str]]) -> dict[str, float]:
        chats = [[{"role": "user", "content": example.prompt}] for example in self.eval]
        completions = generate(chats)
        rewards = [sort_reward(text, example.digits) for text, example in zip(completions, self.eval)]
        exact = [text.strip() == example.answer for text, example in zip(completions, self.eval)]
        return {"reward": float(np.mean(rewards)), "exact_match": float(np.mean(exact))}
