"""DAPO: Decoupled clip and Dynamic sAmpling Policy Optimization.

Yu et al. 2025 (ByteDance Seed), arXiv 2503.14476, Eq. 8. Token credit unit, as GRPO, with
four changes:

    J = E_{q, {o_i} ~ pi_old} [ (1 / sum_i |o_i|) sum_i sum_t
            min(r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i) ]
        subject to 0 < |{o_i : correct}| < G

1. Clip-higher (§3.1): eps_low = 0.2, eps_high = 0.28 (the upper bound is raised so
   low-probability exploration tokens can grow).
2. Token-level loss (§3.3): normalise by the total token count of the batch
   (`loss_agg_mode = token_mean`); no KL term.
3. Overlong reward shaping (§3.4, Eq. 13), added to the task reward, with L = |o_i|:

       R_length = 0                                   if L <= L_max - L_cache
                = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
                = -1                                  if L > L_max

4. Dynamic sampling (§3.2): groups whose G rewards are all equal have zero advantage and
   no gradient; they are dropped and more prompts are sampled until the batch is full
   (the trainer re-samples, at most `trainer.max_generation_rounds` rounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.base import StrategyConfig
from algorithms.grpo import GRPO
from engine.config import check
from engine.learner import Rewards
from engine.loss import group_reward_spread
from engine.rollout import Rollout


@dataclass
class DAPOConfig(StrategyConfig):
    overlong_max_length: int | None = None  # L_max; None = no overlong shaping
    overlong_cache_length: int = 0  # L_cache
    dynamic_sampling: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.overlong_max_length is None or self.overlong_max_length >= 1, "overlong_max_length",
              self.overlong_max_length, "must be >= 1 (or none: no overlong shaping)")
        check(self.overlong_cache_length >= 0 and self.overlong_cache_length <= (self.overlong_max_length or 0)
              or self.overlong_cache_length == 0, "overlong_cache_length", self.overlong_cache_length,
              "must be in [0, overlong_max_length]")


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int) -> Tensor:
    """DAPO's soft overlong punishment for completion lengths [B]; values in [-1, 0]."""
    if not 0 <= cache_length <= max_length:
        raise ValueError(f"need 0 <= overlong_cache_length <= overlong_max_length, got {cache_length}, {max_length}")
    lengths = lengths.float()
    if cache_length == 0:
        return torch.where(lengths > max_length, -1.0, 0.0)
    penalty = (max_length - cache_length - lengths) / cache_length  # linear 0 -> -1 inside the cache window
    return penalty.clamp(min=-1.0, max=0.0)


class DAPO(GRPO):
    """Token unit + overlong shaping + dynamic sampling (clip-higher and token_mean are its defaults)."""

    name = "dapo"
    Config = DAPOConfig
    defaults = {"learner.clip_ratio_low": 0.2, "learner.clip_ratio_high": 0.28, "learner.loss_agg_mode": "token_mean",
                "learner.kl_coef": 0.0, "trainer.max_generation_rounds": 3}

    def shape_rewards(self, rewards: Rewards, rollout: Rollout) -> Rewards:
        if self.config.overlong_max_length is None:
            return rewards
        penalty = overlong_penalty(rollout.completion_lengths, self.config.overlong_max_length,
                                   self.config.overlong_cache_length)  # [B]
        return Rewards(rewards.values + penalty[:, None].to(rewards.values.dtype), rewards.mask, rewards.extras)

    def keep_groups(self, rewards: Rewards, rollout: Rollout) -> Tensor | None:
        """Keep a group only when its rewards are not all equal; [P] bool in group order."""
        if not self.config.dynamic_sampling:
            return None
        return group_reward_spread(rewards.values, rewards.mask, rollout.group_ids)
