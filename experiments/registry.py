"""Named experiments and the tasks they run.

An experiment names its kind, task and algorithm, and the settings in which it differs
from the defaults (dotted config keys, experiments/config.py): everything else is the
engine's default or, for the loss, the strategy's paper default (algorithms/*.py).
`--quick` applies the `quick` settings on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from experiments.rec_task import RecTaskConfig, build_recommendation_task
from experiments.sort_task import SortTaskConfig, build_sort_task


@dataclass(frozen=True)
class TaskType:
    """A task's config dataclass (the `task.*` keys) and its builder:
    build(experiment config, data dir) -> (task, tokenizer corpus, data source, data fingerprint)."""

    config: type
    build: Callable


TASKS = {
    "sort": TaskType(SortTaskConfig, build_sort_task),
    "recommendation": TaskType(RecTaskConfig, build_recommendation_task),
}


@dataclass
class Experiment:
    description: str
    kind: str  # rl | sft | baselines
    task_type: str  # a key of TASKS
    algorithm: str
    settings: dict[str, object] = field(default_factory=dict)
    quick: dict[str, object] = field(default_factory=dict)


# Digit sorting: a tiny model is warm-started with 100 SFT steps (eval reward ~0.1: it
# has learnt the answer format, not yet sorting) and RL takes it from there.
SORT = {
    "model.vocab_size": 300, "model.tiny.hidden_size": 128, "model.tiny.num_layers": 2,
    "model.tiny.intermediate_size": 344, "sampling.max_new_tokens": 12, "sft.steps": 100, "sft.lr": 3e-3,
    "learner.lr": 3e-4, "learner.micro_batch_size": 32, "trainer.max_steps": 400, "trainer.prompts_per_step": 8,
    "trainer.save_every": 100, "trainer.eval_every": 100,
}
SORT_QUICK = {"trainer.max_steps": 100, "trainer.save_every": 0, "trainer.eval_every": 0, "task.eval_size": 64}

# Conversational recommendation (Rank-GRPO's setting). Reddit-v2 when present in the
# data dir, else the MovieLens-100K conversational set. Tiny Qwen2 (config C0 dims),
# tokenizer trained on the data, SFT warm start from an EASE teacher's lists (cached per
# config), then RL. Every RL variant shares the SFT checkpoint and the k3 KL to it
# (1e-3, the Rank-GRPO code's); GRPO and Rank-GRPO also share that code's clip range
# (0.06 / 0.08) and token-mean aggregation, so the credit unit is the only difference
# between them; GSPO keeps its paper's clip range and sequence-mean aggregation.
REC = {
    "sampling.max_new_tokens": 128, "trainer.max_prompt_length": 256, "model.vocab_size": 4096,
    "sft.steps": 400, "learner.lr": 2e-5, "trainer.max_steps": 150, "trainer.prompts_per_step": 8,
    "learner.micro_batch_size": 16, "trainer.save_every": 50, "trainer.eval_every": 50,
    "learner.kl_coef": 1e-3, "learner.kl_loss_type": "k3",
}
RANK_GRPO_CODE_LOSS = {"learner.clip_ratio_low": 0.06, "learner.clip_ratio_high": 0.08,
                       "learner.loss_agg_mode": "token_mean"}
REC_QUICK = {
    "sft.steps": 60, "trainer.max_steps": 8, "task.eval_size": 48, "trainer.save_every": 0, "trainer.eval_every": 0,
    "model.tiny.hidden_size": 128, "model.tiny.num_layers": 2, "model.tiny.intermediate_size": 344,
    "model.vocab_size": 2048, "trainer.prompts_per_step": 2,
}


def _sort(algorithm: str, description: str, **settings) -> Experiment:
    return Experiment(description, "rl", "sort", algorithm, {**SORT, **settings}, dict(SORT_QUICK))


def _rec(kind: str, algorithm: str, description: str, **settings) -> Experiment:
    return Experiment(description, kind, "recommendation", algorithm, {**REC, **settings}, dict(REC_QUICK))


EXPERIMENTS: dict[str, Experiment] = {
    "grpo_sort": _sort("grpo", "GRPO (token unit) learns to sort digits; no recommendation code",
                       **{"learner.kl_coef": 0.0}),
    # The paper's 3e-4 / 4e-4 clip assumes small off-policy drift per mini-batch; with
    # on-policy updates (ppo_epochs 1) the ratio is exactly 1 and the clip never acts.
    "gspo_sort": _sort("gspo", "GSPO (sequence unit) on digit sorting"),
    "dapo_sort": _sort("dapo", "DAPO (clip-higher, token_mean, overlong shaping, dynamic sampling) on digit sorting",
                       **{"strategy.overlong_max_length": 12, "strategy.overlong_cache_length": 4}),
    "baselines_ml100k": Experiment(
        "popularity, item-kNN and EASE on the MovieLens-100K test split (Recall/NDCG @5/10/20)",
        "baselines", "recommendation", "grpo", {"task.source": "movielens-100k", "task.list_length": 20},
    ),
    "sft_reddit": _rec("sft", "grpo", "SFT warm start only (EASE-teacher demonstrations)"),
    "grpo_reddit": _rec("rl", "grpo", "SFT + GRPO: token unit, sequence reward NDCG@N",
                        **{"task.reward_kind": "ndcg", **RANK_GRPO_CODE_LOSS}),
    "gspo_reddit": _rec("rl", "gspo", "SFT + GSPO: sequence unit, sequence reward NDCG@N",
                        **{"task.reward_kind": "ndcg"}),
    "rank_grpo_reddit": _rec("rl", "rank_grpo", "the headline: SFT + Rank-GRPO, rank unit, exp_inf per-rank reward",
                             **{"task.reward_kind": "exp_inf", **RANK_GRPO_CODE_LOSS}),
    "rank_grpo_log_reddit": _rec("rl", "rank_grpo",
                                 "SFT + Rank-GRPO with the log_decay (causal DCG suffix) per-rank reward",
                                 **{"task.reward_kind": "log_decay", **RANK_GRPO_CODE_LOSS}),
}


def experiment_names() -> list[str]:
    return sorted(EXPERIMENTS)
