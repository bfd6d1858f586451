"""ReRec: reasoning-aware advantage estimation (RAAE) on line segments, and the online curriculum.

Huang, Wang, Ning, Fan, Li, "ReRec: Reasoning-Augmented LLM-based Recommendation Assistant via
Reinforcement Fine-tuning", arXiv 2604.07851 (ACL 2026); official code github.com/jiani-huang/ReRec
(a verl fork). recrl's reading of both, with every gap we filled: docs/rerec.md.

For a prompt x the policy samples G completions o_1..o_G. Completion i reasons in lines and boxes
one item p_i; the task scores it with the sequence reward r_i (NDCG@1 plus the dual-graph terms,
experiments/rerec_task.py) and flags its lines (rewards/rerec.py ``penalised_lines``).

1. Segments. A segment is a raw "\\n" line of the completion (the code splits on "\\n"; the paper
   speaks of paragraphs). The segment of token t is the number of newlines in the tokens before
   it (``LineSegmenter``; a newline token belongs to the line it ends, EOS to the last line):

       seg(t) = sum_{t' < t} newlines(y_t')                                  unit_ids [B, T]

2. Segment rewards (RAAE). When p_i is wrong, a line that names p_i and holds no ``\\boxed`` is
   penalised:

       r_{i,k} = r_i - w_penalty |r_i|   on penalised lines   (= (1 - w_penalty) r_i for r_i >= 0)
       r_{i,k} = r_i                     on every other line, and on every line of a right answer

   w_penalty = 0.3 (the code's min_token_reward_ratio 0.7); w_penalty = 0 switches RAAE off.

3. Token advantages, group-normalised (``statistics``):

       sequence (default)  mu, sigma = mean and unbiased std of the G sequence rewards r_1..r_G
       token               mu, sigma = mean and unbiased std of r_{i,seg(t)} over every token of the group
       A_{i,t} = (r_{i,seg(t)} - mu) / (sigma + eps)

   The default follows the paper's formula and verl's GRPO (the code's
   ``compute_raae_outcome_advantage`` is not public). A group whose G sequence rewards are all
   equal gets A = 0 in the sequence reading, as in GRPO: there sigma = 0 and the literal formula
   would give a penalised token -w_penalty |r| / eps, a 1/eps blow-up. Note that with a 0/1
   reward (no graph terms) a wrong answer scores 0, (1 - w) 0 = 0, and RAAE equals GRPO exactly.

4. Loss: the clipped token-level objective of GRPO with each token's own ratio (``ratio_level =
   "token"``), token-mean aggregation and a k3 KL to the reference (coefficient 0.01), the code's
   scripts/train.sh values (the ``defaults`` below):

       J = E[ (1/N) sum_i sum_t min(h_{i,t} A_{i,t}, clip(h_{i,t}, 1 - eps, 1 + eps) A_{i,t}) ] - beta KL

5. Online curriculum (``curriculum``). Each prompt's difficulty is read from its latest rollouts,

       d(x) = (1/G) sum_i (1 - NDCG@1_i)        (the code's difficulty metric; the paper writes r_i)

   and at the start of every epoch after the first, prompts with d < tau (0.1) are dropped for good
   and the rest ordered easy to hard (stable); prompts never rolled out keep their place
   (``curriculum_order``). If every remaining prompt is mastered, nothing is dropped.
   The difficulties and the dropped set are the strategy's state, saved in every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.base import LineSegmenter, Strategy, StrategyConfig
from engine.config import check, check_choice
from engine.rollout import Rollout

STATISTICS = ("sequence", "token")


@dataclass
class ReRecConfig(StrategyConfig):
    penalty_weight: float = 0.3  # w_penalty = 1 - the code's min_token_reward_ratio 0.7; 0 = no RAAE
    statistics: str = "sequence"  # what mu and sigma are taken over: the G sequence rewards | the group's tokens
    curriculum: bool = True
    curriculum_threshold: float = 0.1  # tau (the code's difficulty_threshold): prompts with d < tau are dropped

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.advantage_scale == "group", "advantage_scale", self.advantage_scale,
              "must be group for rerec (RAAE normalises within each group; see strategy.statistics)")
        check(0.0 <= self.penalty_weight <= 1.0, "penalty_weight", self.penalty_weight, "must be in [0, 1]")
        check_choice("statistics", self.statistics, STATISTICS)
        check(0.0 <= self.curriculum_threshold <= 1.0, "curriculum_threshold", self.curriculum_threshold,
              "must be in [0, 1], where the difficulty d = mean(1 - NDCG@1) lies (0: no prompt is ever dropped)")


def group_statistics(values: Tensor, mask: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of the masked entries of each row's group, per row: ([B], [B]).

    values, mask [B, T]; group_ids [B]. A group with fewer than two entries has std 0.
    """
    values, weights = values.double(), mask.double()  # [B, T]
    _, group = torch.unique(group_ids, return_inverse=True)  # [B] in 0..P-1
    num_groups = int(group.max()) + 1

    def per_group(row_sums: Tensor) -> Tensor:  # [B] -> [B]: the sum over the row's group
        return torch.zeros(num_groups, dtype=row_sums.dtype, device=row_sums.device).index_add_(0, group, row_sums)[group]

    counts = per_group(weights.sum(dim=1))  # [B]
    mean = per_group((values * weights).sum(dim=1)) / counts.clamp(min=1)  # [B]
    squares = per_group((((values - mean[:, None]) ** 2) * weights).sum(dim=1))  # [B]
    return mean, (squares / (counts - 1).clamp(min=1)).sqrt()


def curriculum_order(difficulties: Mapping[Hashable, float | None], previous_order: Sequence[Hashable],
                     tau: float) -> list:
    """Next epoch's order: prompts with d < tau dropped, the rest sorted by d ascending (stable), except that a
    prompt without a difficulty (None or absent: never rolled out) keeps its index among the survivors. The code
    sends such prompts to the end (d = 1.0); keeping their place leaves a partial epoch in the data's order.

    Example: previous order [a, b, c, e] with d = 0.5, None, 0.0, 0.2 -> [e, b, a].
    Raises ValueError: a prompt twice in previous_order, a difficulty for a prompt not in it, non-finite values.
    """
    listed = set(previous_order)
    if len(listed) != len(previous_order):
        raise ValueError("a prompt appears twice in previous_order")
    unknown = [prompt for prompt in difficulties if prompt not in listed]
    if unknown:
        raise ValueError(f"difficulty given for {unknown[0]!r}, which is not in previous_order")
    if not all(math.isfinite(value) for value in [tau, *(d for d in difficulties.values() if d is not None)]):
        raise ValueError("difficulties and tau must be finite")
    kept = [prompt for prompt in previous_order if difficulties.get(prompt) is None or difficulties[prompt] >= tau]
    ranked = iter(sorted((prompt for prompt in kept if difficulties.get(prompt) is not None),
                         key=lambda prompt: difficulties[prompt]))
    return [prompt if difficulties.get(prompt) is None else next(ranked) for prompt in kept]


class ReRec(Strategy):
    """Reasoning-segment credit unit: each line's reward is normalised against its group."""

    name = "rerec"
    Config = ReRecConfig
    ratio_level = "token"
    reward_shapes = ("lines",)
    defaults = {"learner.clip_ratio_low": 0.2, "learner.clip_ratio_high": 0.2, "learner.loss_agg_mode": "token_mean",
                "learner.kl_coef": 0.01, "learner.kl_loss_type": "k3"}

    def __init__(self, config: ReRecConfig | None = None, tokenizer=None, task=None):
        super().__init__(config, tokenizer, task)
        self.segment = LineSegmenter(tokenizer)
        self.difficulty: dict[int, float] = {}  # prompt index -> d(x) of its latest rollouts
        self.dropped: set[int] = set()  # prompts the curriculum dropped as mastered

    # --- the credit unit ------------------------------------------------------
    def unit_ids(self, rollout: Rollout, rewards) -> Tensor:
        return self.segment(rollout.completion_ids, rollout.completion_mask, max_line=rewards.values.shape[1] - 1)

    def segment_rewards(self, rewards) -> Tensor:
        """r_{i,k} [B, U]: r_i - w |r_i| on penalised lines, r_i elsewhere; r_i = the row's value of unit 0."""
        if "penalised" not in rewards.extras:
            raise ValueError("rerec needs the task's per-line RAAE flags (Rewards.extras['penalised'], [B, U]); "
                             "with the ReRec task set task.reward_unit=line")
        sequence_reward = rewards.values[:, :1]  # [B, 1]
        penalised = rewards.extras["penalised"].bool() & rewards.mask  # [B, U]
        penalty = self.config.penalty_weight * sequence_reward.abs()  # [B, 1]
        return torch.where(penalised, sequence_reward - penalty, sequence_reward.expand_as(rewards.values))

    def advantages(self, rewards, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        """A_{i,t} = (r_{i,seg(t)} - mu) / (sigma + eps) [B, T] (module docstring, item 3)."""
        token_mask = rollout.completion_mask.bool() & (unit_ids >= 0)  # [B, T]
        token_rewards = self.segment_rewards(rewards).gather(1, unit_ids.clamp(min=0)).double()  # [B, T]
        sequence_reward = rewards.values[:, :1]  # [B, 1]
        if self.config.statistics == "sequence":
            mean, std = group_statistics(sequence_reward, torch.ones_like(sequence_reward, dtype=torch.bool),
                                         rollout.group_ids)  # [B], [B]
        else:
            mean, std = group_statistics(token_rewards, token_mask, rollout.group_ids)  # [B], [B]
        advantages = (token_rewards - mean[:, None]) / (std[:, None] + self.config.advantage_eps)  # [B, T]
        _, group = torch.unique(rollout.group_ids, return_inverse=True)  # [B]
        reward = sequence_reward[:, 0]  # [B]
        highest = reward.new_full((int(group.max()) + 1,), -math.inf).scatter_reduce(0, group, reward, "amax")
        lowest = reward.new_full((int(group.max()) + 1,), math.inf).scatter_reduce(0, group, reward, "amin")
        spread = (highest > lowest)[group]  # [B]: the group's sequence rewards differ
        if self.config.statistics == "sequence":
            advantages = advantages * spread[:, None]
        return (advantages * token_mask).float()  # [B, T]

    # --- the curriculum -------------------------------------------------------
    def shape_rewards(self, rewards, rollout: Rollout):
        """Record d(x) = mean over the prompt's rollouts of 1 - NDCG@1 (rewards unchanged)."""
        if self.config.curriculum:
            if "ndcg_at_1" not in rewards.extras:
                raise ValueError("the rerec curriculum needs Rewards.extras['ndcg_at_1'] [B] from the task; "
                                 "use the ReRec task or set strategy.curriculum=false")
            prompts, row_prompt = torch.unique(rollout.prompt_indices, return_inverse=True)  # [P], [B]
            misses = torch.zeros(len(prompts), dtype=torch.float64, device=prompts.device)
            misses.index_add_(0, row_prompt, 1.0 - rewards.extras["ndcg_at_1"].double())
            counts = torch.bincount(row_prompt, minlength=len(prompts))  # [P]
            self.difficulty.update(zip(prompts.tolist(), (misses / counts).tolist()))
        return rewards

    def order_prompts(self, epoch: int, order: list[int]) -> list[int]:
        """Drop mastered prompts (d < tau) for good, order the rest easy to hard; unseen prompts keep their place."""
        if not self.config.curriculum:
            return order
        remaining = [prompt for prompt in order if prompt not in self.dropped]
        ordered = curriculum_order({p: self.difficulty.get(p) for p in remaining}, remaining,
                                   self.config.curriculum_threshold)
        if not ordered:
            return remaining
        self.dropped.update(set(remaining) - set(ordered))
        return ordered

    def state_dict(self) -> dict:
        return {"difficulty": dict(self.difficulty), "dropped": sorted(self.dropped)}

    def load_state_dict(self, state: dict) -> None:
        self.difficulty = {int(prompt): float(value) for prompt, value in state["difficulty"].items()}
        self.dropped = {int(prompt) for prompt in state["dropped"]}
