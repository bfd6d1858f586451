"""Named experiments and the tasks they run.

An experiment names its kind, task and algorithm, and the settings in which it differs
from the defaults (dotted config keys, experiments/config.py): everything else is the
engine's default or, for the loss, the strategy's paper default (algorithms/*.py).
`--quick` applies the `quick` settings on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from experiments.gr2_task import GR2TaskConfig, build_gr2_task
from experiments.rec_task import RecTaskConfig, build_recommendation_task
from experiments.recpo_task import RecPOTaskConfig, build_recpo_task
from experiments.rerec_task import ReRecTaskConfig, build_rerec_task
from experiments.sort_task import SortTaskConfig, build_sort_task


@dataclass(frozen=True)
class TaskType:
    """A task's config dataclass (the `task.*` keys) and its builder:
    build(experiment config, data dir) -> (task, tokenizer corpus, data source, data fingerprint);
    `reads_data`: False for a task that builds its own examples (--data-dir means nothing to it)."""

    config: type
    build: Callable
    reads_data: bool = True


TASKS = {
    "sort": TaskType(SortTaskConfig, build_sort_task, reads_data=False),
    "recommendation": TaskType(RecTaskConfig, build_recommendation_task),
    "recpo": TaskType(RecPOTaskConfig, build_recpo_task),
    "rerec": TaskType(ReRecTaskConfig, build_rerec_task),
    "gr2": TaskType(GR2TaskConfig, build_gr2_task),
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
# data dir, else the MovieLens-100K conversational set with a request at every usable
# prefix of each training history (65,582). Tiny Qwen2 (hidden 128, 4 layers), a 1,024-token
# BPE tokenizer trained on the data plus one token per catalog item, decoding that never
# repeats an item nor names one the user has seen; SFT warm start from an EASE teacher's
# lists (cached per config), then RL, with the model, tokenizer and SFT length chosen on
# validation NDCG@10 (README "Results"). Every RL variant shares the k3 KL to the SFT model
# (1e-3, the Rank-GRPO code's) and 2 mini-batches per pass; GRPO and Rank-GRPO also share
# that code's clip range (0.06 / 0.08) and token-mean aggregation, so the credit unit is the
# only difference between them; GSPO keeps its paper's clip range and sequence-mean aggregation.
# `python -m experiments.study` runs them at ppo_epochs 1, 2, 4 over three seeds.
REC = {
    "task.train_cut_points": None, "task.item_tokens": True, "task.decode_constraint": "unseen",
    "model.vocab_size": 1024, "model.tiny.hidden_size": 128, "model.tiny.intermediate_size": 344,
    "sampling.max_new_tokens": 64, "trainer.max_prompt_length": 256,
    "sft.steps": 500, "learner.lr": 2e-5, "trainer.max_steps": 100, "trainer.prompts_per_step": 8,
    "learner.mini_batches": 2, "learner.micro_batch_size": 32, "trainer.save_every": 50, "trainer.eval_every": 25,
    "learner.kl_coef": 1e-3, "learner.kl_loss_type": "k3",
}
RANK_GRPO_CODE_LOSS = {"learner.clip_ratio_low": 0.06, "learner.clip_ratio_high": 0.08,
                       "learner.loss_agg_mode": "token_mean"}
REC_QUICK = {
    "sft.steps": 60, "trainer.max_steps": 8, "task.eval_size": 48, "trainer.save_every": 0, "trainer.eval_every": 0,
    "model.tiny.num_layers": 2, "model.vocab_size": 512, "trainer.prompts_per_step": 2, "task.train_cut_points": 3,
}


# ReRec on MovieLens-100K (experiments/rerec_task.py, docs/rerec.md): 1-of-20 multiple choice with
# reasoning lines. Tiny Qwen2 (hidden 192, 3 layers), SFT on data-built rationales (cached, shared
# by every variant), then RL on a pool of 256 prompts (~3 epochs, so the curriculum acts) with the
# official code's G = 5, clip 0.2, token-mean, k3 KL 0.01. GRPO gets the same loss and the 0/1
# reward, so the ladder GRPO -> + RAAE -> + dual-graph reward -> + curriculum changes one thing at a time.
RE_REC = {
    "model.vocab_size": 4096, "model.tiny.hidden_size": 192, "model.tiny.num_layers": 3,
    "model.tiny.intermediate_size": 512, "sampling.max_new_tokens": 96, "trainer.max_prompt_length": 384,
    "sft.steps": 300, "trainer.group_size": 5, "trainer.prompts_per_step": 8, "trainer.max_steps": 100,
    "learner.lr": 5e-5, "learner.micro_batch_size": 20, "trainer.eval_every": 25, "trainer.save_every": 25,
    "learner.clip_ratio_low": 0.2, "learner.clip_ratio_high": 0.2, "learner.loss_agg_mode": "token_mean",
    "learner.kl_coef": 0.01, "learner.kl_loss_type": "k3",
}
RE_REC_QUICK = {
    "model.tiny.hidden_size": 128, "model.tiny.num_layers": 2, "model.tiny.intermediate_size": 344,
    "model.vocab_size": 2048, "sft.steps": 40, "trainer.max_steps": 6, "trainer.prompts_per_step": 4,
    "task.rl_prompts": 8, "task.val_size": 16, "task.test_size": 32, "trainer.eval_every": 3, "trainer.save_every": 0,
}


# RecPO / R²ec on MovieLens-100K (experiments/recpo_task.py, docs/recpo.md): reasoning ending in
# <answer>, full-catalogue ranking from h_T. Tiny Qwen2 (C0), stage 1 on data-built rationales plus
# the head's in-batch softmax (cached, shared by every variant), then RecPO with the official code's
# G = 4, clip 0.2 / 0.28, no KL; validation NDCG@10 chooses the reported checkpoint.
RECPO = {
    "model.vocab_size": 4096, "sampling.max_new_tokens": 64, "trainer.max_prompt_length": 256,
    "sft.lr": 1e-3, "sft.batch_size": 32, "trainer.group_size": 4, "trainer.prompts_per_step": 8,
    "sft.steps": 250, "trainer.max_steps": 100, "learner.lr": 1e-4, "learner.micro_batch_size": 32,
    "task.refresh_every": 20, "trainer.eval_every": 25, "trainer.save_every": 25,
}
RECPO_QUICK = {
    "model.tiny.hidden_size": 128, "model.tiny.num_layers": 2, "model.tiny.intermediate_size": 344,
    "model.vocab_size": 2048, "task.prefixes_per_user": 1, "task.item_facts": 1, "sft.steps": 20,
    "sft.batch_size": 16, "trainer.max_steps": 4, "trainer.prompts_per_step": 4, "task.val_size": 16,
    "task.test_size": 32, "task.refresh_every": 3, "trainer.eval_every": 0, "trainer.save_every": 0,
}


def _recpo(description: str, **settings) -> Experiment:
    return Experiment(description, "rl", "recpo", "recpo", {**RECPO, **settings}, dict(RECPO_QUICK))


def _sort(algorithm: str, description: str, **settings) -> Experiment:
    return Experiment(description, "rl", "sort", algorithm, {**SORT, **settings}, dict(SORT_QUICK))


def _rec(kind: str, algorithm: str, description: str, **settings) -> Experiment:
    return Experiment(description, kind, "recommendation", algorithm, {**REC, **settings}, dict(REC_QUICK))

# GR2 (experiments/gr2_task.py): rerank EASE's top 10 with SIDs; mid-training + SFT on teacher traces
# (cached per stage), then DAPO (paper defaults: clip 0.2 / 0.28, token_mean, no KL, dynamic sampling)
# with overlong shaping past 68 of the 80 new tokens (a trace is ~60).
GR2 = {
    "model.vocab_size": 2048, "sampling.max_new_tokens": 80, "trainer.max_prompt_length": 384,
    "task.midtrain_steps": 300, "sft.steps": 300, "sft.lr": 1e-3, "sft.batch_size": 16,
    "trainer.group_size": 8, "trainer.prompts_per_step": 4, "trainer.max_steps": 100, "learner.lr": 5e-5,
    "learner.micro_batch_size": 16, "trainer.eval_every": 20, "trainer.save_every": 20,
    "strategy.overlong_max_length": 80, "strategy.overlong_cache_length": 12,
}
GR2_QUICK = {
    "model.tiny.hidden_size": 64, "model.tiny.num_layers": 2, "model.tiny.intermediate_size": 128,
    "model.vocab_size": 1024, "task.train_prefixes_per_user": 2, "task.midtrain_steps": 20, "sft.steps": 20,
    "trainer.max_steps": 4, "trainer.prompts_per_step": 2, "task.eval_size": 24, "trainer.eval_every": 2,
    "trainer.save_every": 0,
}

GR2_REPEATS = {"task.allow_repeated_candidates": True, "task.unparseable_reward": 0.0}


def _gr2(description: str, **settings) -> Experiment:
    return Experiment(description, "rl", "gr2", "dapo", {**GR2, **settings}, dict(GR2_QUICK))


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
    "rerec_ml100k": Experiment("ReRec: SFT + RAAE (line unit), dual-graph reward, online curriculum; "
                               "1-of-20 MovieLens-100K choice", "rl", "rerec", "rerec", dict(RE_REC), dict(RE_REC_QUICK)),
    "grpo_rerec_ml100k": Experiment("SFT + GRPO on the ReRec task: sequence unit, 0/1 reward (NDCG@1)", "rl", "rerec",
                                    "grpo", {**RE_REC, "task.reward_unit": "sequence", "task.query_weight": 0.0,
                                             "task.preference_weight": 0.0}, dict(RE_REC_QUICK)),
    "recpo_ml100k": _recpo("R²ec / RecPO: reasoning + item head, best-path head credit, full-catalogue ranking"),
    "recpo_no_rc_ml100k": _recpo("RecPO without R_c (beta = 0: the ranking reward alone)",
                                 **{"strategy.reward_beta": 0.0}),
    "recpo_no_rd_ml100k": _recpo("RecPO without R_d (beta = 1: the catalogue probability alone)",
                                 **{"strategy.reward_beta": 1.0}),
    "gr2_ml100k": _gr2("GR2: SID reranker of EASE's top 10; mid-training, SFT on rejection-sampled traces, DAPO "
                       "with the conditional reward"),
    "gr2_targeted_ml100k": _gr2("GR2 with SFT on targeted traces (x* revealed to the teacher)",
                                **{"task.trace_variant": "targeted"}),
    "gr2_unconditional_ml100k": _gr2("GR2 with the unconditional reward R_rank + alpha R_fmt (the order-copy hack)",
                                     **{"task.conditional_reward": False}),
    # the reward-hack measurement: free (unconstrained) ranked part, a broken format earns 0 as read from the paper
    "gr2_free_unconditional_ml100k": _gr2("GR2, unconstrained decoding, unparseable = 0, unconditional reward",
                                          **{"task.conditional_reward": False, "task.constrained_decoding": False,
                                             "task.unparseable_reward": 0.0}),
    "gr2_free_conditional_ml100k": _gr2("GR2, unconstrained decoding, unparseable = 0, conditional reward",
                                        **{"task.constrained_decoding": False, "task.unparseable_reward": 0.0}),
    # the same measurement with the ranked lines restricted to candidate SIDs, repeats allowed: a repeat breaks the
    # format, so a copy of the input order is a safe parseable answer (a policy that writes valid lists on its own
    # is needed: the tiny model writes none, docs/gr2.md)
    "gr2_repeats_unconditional_ml100k": _gr2("GR2, candidate lines may repeat (a repeat is unparseable = 0), "
                                             "unconditional reward", **{"task.conditional_reward": False,
                                                                        **GR2_REPEATS}),
    "gr2_repeats_conditional_ml100k": _gr2("GR2, candidate lines may repeat (a repeat is unparseable = 0), "
                                           "conditional reward", **GR2_REPEATS),
}


def experiment_names() -> list[str]:
    return sorted(EXPERIMENTS)
