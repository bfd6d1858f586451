"""The conversational recommendation task: prompts, list rewards, and Recall/NDCG evaluation.

Rewards for a generated list (rewards/ does the parsing and matching):

    hits_k  = 1 if line k is a catalog item, not seen, matching an unused ground-truth item
    exp_inf   r_k = hits_k                                  (Rank-GRPO default)
    exp_gamma r_k = sum_{j >= k} hits_j / gamma^(j - k)
    log_decay r_k = sum_{j >= k} hits_j / log2(j + 1)       (causal DCG suffix)
    ndcg      R   = NDCG@N of the whole list                (one sequence reward, for GRPO / GSPO)

The first three give per-rank rewards [B, N] (rank_grpo); `ndcg` gives [B].
Evaluation decodes greedily on the validation split (NDCG@10 chooses the reported
checkpoint) or the test split and averages Recall@K / NDCG@K.

The list length N is the data source's own (Reddit-v2 prompts ask for 20 items, the
MovieLens requests for 10 unless `task.list_length` says otherwise). SFT demonstrations
on MovieLens are an EASE teacher's lists (experiments/baselines.py; docs/rank_grpo.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.config import check, check_choice
from experiments.data import RecData
from rewards.catalog import rank_hits
from rewards.lists import format_item, parse_list
from rewards.ranking import evaluate_list, mean_metrics, rank_rewards, sequence_ndcg

PER_RANK_REWARDS = ("exp_inf", "exp_gamma", "log_decay")
REWARD_KINDS = PER_RANK_REWARDS + ("ndcg",)
SOURCES = ("auto", "reddit-v2", "movielens-100k")


@dataclass
class RecTaskConfig:
    source: str = "auto"  # auto: Reddit-v2 when its conversations are in the data dir, else MovieLens-100K
    list_length: int | None = None  # N; None = the data source's own (Reddit-v2: 20, MovieLens: 10)
    reward_kind: str = "exp_inf"
    reward_gamma: float = 2.0  # Gamma of exp_gamma
    eval_size: int = 0  # evaluate on the first eval_size requests of the val and test splits; 0 = all
    train_cut_points: int | None = 3  # MovieLens training requests per user; None = every usable prefix

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check(self.list_length is None or self.list_length >= 2, "list_length", self.list_length,
              "must be >= 2 (or none for the data source's own)")
        check_choice("reward_kind", self.reward_kind, REWARD_KINDS)
        check(self.reward_gamma > 1, "reward_gamma", self.reward_gamma, "must be > 1")
        check(self.eval_size >= 0, "eval_size", self.eval_size, "must be >= 0 (0 = the whole test split)")
        check(self.train_cut_points is None or self.train_cut_points >= 1, "train_cut_points", self.train_cut_points,
              "must be >= 1 (or none for every usable prefix)")


class RecommendationTask:
    selection_metric = "ndcg@10"

    def __init__(self, data: RecData, list_length: int, reward_kind: str, reward_gamma: float = 2.0,
                 eval_size: int = 0):
        check_choice("reward_kind", reward_kind, REWARD_KINDS)
        if not data.train:
            raise ValueError(f"the {data.source} training split is empty")
        self.data = data
        self.list_length = list_length
        self.reward_kind = reward_kind
        self.reward_gamma = reward_gamma
        # Fixed, deterministic evaluation subsets: the first `eval_size` examples of each split.
        self.splits = {"val": data.val[:eval_size] if eval_size else data.val,
                       "test": data.test[:eval_size] if eval_size else data.test}

    # --- training prompts and rewards ------------------------------------
    def num_train_prompts(self) -> int:
        return len(self.data.train)

    def train_messages(self, index: int) -> list[dict]:
        return self.data.train[index].messages

    def hits(self, example, completion: str) -> list[int]:
        return rank_hits(parse_list(completion), example.groundtruth, example.seen, self.data.catalog,
                         self.list_length)

    def rewards(self, prompt_indices: list[int], completions: list[str], rollout=None) -> torch.Tensor:
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
    def evaluate(self, generate: Callable[..., list[str]], split: str = "test") -> dict[str, float]:
        examples = self.splits[split]
        completions = generate([e.messages for e in examples])
        metrics = [evaluate_list(text, e, self.data.catalog) for text, e in zip(completions, examples)]
        result = mean_metrics(metrics)
        result["in_catalog_frac"] = float(np.mean([
            np.mean([line.item is not None and line.item in self.data.catalog for line in parse_list(text)] or [0.0])
            for text in completions
        ]))
        return result


def build_recommendation_task(config, data_dir: str | None) -> tuple[RecommendationTask, list[str], str, str]:
    """(task, tokenizer corpus, data source, data fingerprint) for an experiment's config.

    Loads Reddit-v2 or MovieLens-100K (experiments.data); MovieLens training and validation
    requests get EASE-teacher demonstrations for the SFT warm start.
    """
    from experiments.baselines import attach_demonstrations, fit_teacher
    from experiments.data import DataError, load_recommendation_data

    settings = config.task
    data = load_recommendation_data(data_dir, list_length=settings.list_length or 10, source=settings.source,
                                    verbose=False, train_cuts_per_user=settings.train_cut_points)
    if settings.list_length is not None and settings.list_length != data.list_length:
        raise DataError(f"task.list_length={settings.list_length}: the {data.source} prompts ask for "
                        f"{data.list_length} items; leave task.list_length unset (none) to use the data's own")
    if data.movielens is not None:
        teacher = fit_teacher(data.movielens, part="train")
        attach_demonstrations(data.train, teacher, data.movielens)
        attach_demonstrations(data.val, teacher, data.movielens)
        print(f"data: Reddit-v2 not found in the data dir; using the MovieLens-100K conversational set instead "
              f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test requests)")
    else:
        print(f"data: Reddit-v2 conversations ({len(data.train)} train / {len(data.val)} val / {len(data.test)} test)")
    task = RecommendationTask(data, data.list_length, settings.reward_kind, settings.reward_gamma, settings.eval_size)
    return task, task.corpus(), data.source, data.fingerprint
