"""The conversational recommendation task: prompts, list rewards, and Recall/NDCG evaluation.

Rewards for a generated list (rewards/ does the parsing and matching):

    hits_k  = 1 if line k is a catalog item, not seen, matching an unused ground-truth item
    exp_inf   r_k = hits_k                                  (Rank-GRPO default)
    exp_gamma r_k = sum_{j >= k} hits_j / gamma^(j - k)
    log_decay r_k = sum_{j >= k} hits_j / log2(j + 1)       (causal DCG suffix)
    ndcg      R   = NDCG@N of the whole list                (one sequence reward, for GRPO / GSPO)

The first three give per-rank rewards [B, N] (rank_grpo); `ndcg` gives [B].
Evaluation decodes greedily on the test split and averages Recall@K / NDCG@K.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from experiments.data import RecData
from rewards.catalog import rank_hits
from rewards.lists import format_item, parse_list
from rewards.ranking import evaluate_list, mean_metrics, rank_rewards, sequence_ndcg

PER_RANK_REWARDS = ("exp_inf", "exp_gamma", "log_decay")
REWARD_KINDS = PER_RANK_REWARDS + ("ndcg",)


class RecommendationTask:
    def __init__(self, data: RecData, list_length: int, reward_kind: str, reward_gamma: float = 2.0,
                 eval_size: int = 0):
        if reward_kind not in REWARD_KINDS:
            raise ValueError(f"unknown reward_kind {reward_kind!r}; choose one of {REWARD_KINDS}")
        if not data.train:
            raise ValueError(f"the {data.source} training split is empty")
        self.data = data
        self.list_length = list_length
        self.reward_kind = reward_kind
        self.reward_gamma = reward_gamma
        # A fixed, deterministic evaluation subset: the first `eval_size` test examples.
        self.eval_examples = data.test[:eval_size] if eval_size else data.test

    # --- training prompts and rewards ------------------------------------
    def num_train_prompts(self) -> int:
        return len(self.data.train)

    def train_messages(self, index: int) -> list[dict]:
        return self.data.train[index].messages

    def hits(self, example, completion: str) -> list[int]:
        return rank_hits(parse_list(completion), example.groundtruth, example.seen, self.data.catalog,
                         self.list_length)

    def rewards(self, prompt_indices: list[int], completions: list[str]) -> torch.Tensor:
        examples = [self.data.train[i] for i in prompt_indices]
        hits = np.array([self.hits(example, text) for example, text in zip(examples, completions)])  # [B, N]
        if self.reward_kind == "ndcg":
            return torch.tensor([sequence_ndcg(row, num_relevant=len(example.groundtruth))
                                 for row, example in zip(hits, examples)], dtype=torch.float32)  # [B]
        gamma = self.reward_gamma if self.reward_kind == "exp_gamma" else None
        return torch.tensor(rank_rewards(hits, self.reward_kind, gamma), dtype=torch.float32)  # [B, N]

    # --- supervised warm start ------------------------------------------
    def demonstrations(self) -> tuple[list[list[dict]], list[str]]:
        examples = [e for e in self.data.train if e.demonstration]
        if not examples:
            raise ValueError(f"the {self.data.source} training split has no demonstrations for SFT")
        return [e.messages for e in examples], [e.demonstration for e in examples]

    def corpus(self) -> list[str]:
        """Text for the tokenizer: prompts, demonstrations and every catalog title."""
        texts = [message["content"] for e in self.data.train for message in e.messages]
        texts += [e.demonstration for e in self.data.train if e.demonstration]
        texts += [format_item(item) for item in self.data.catalog]
        return texts

    # --- evaluation -------------------------------------------------------
    def evaluate(self, generate: Callable[[list[list[dict]]], list[str]]) -> dict[str, float]:
        completions = generate([e.messages for e in self.eval_examples])
        metrics = [evaluate_list(text, e, self.data.catalog) for text, e in zip(completions, self.eval_examples)]
        result = mean_metrics(metrics)
        result["in_catalog_frac"] = float(np.mean([
            np.mean([line.item is not None and line.item in self.data.catalog for line in parse_list(text)] or [0.0])
            for text in completions
        ]))
        return result
