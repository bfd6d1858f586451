"""DAPO: Decoupled clip and Dynamic sAmpling Policy Optimization.

Yu et al. 2025 (ByteDance Seed), arXiv 2503.14476. Token credit unit, as GRPO, with
four changes:

    J = E_{q, {o_i} ~ pi_old} [ (1 / sum_i |o_i|) sum_i sum_t
            min(r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i) ]
        subject to 0 < |{o_i : correct}| < G

1. Clip-higher: eps_low = 0.2, eps_high = 0.28 (the upper bound is raised so low-probability
   exploration tokens can grow; set through the `clip_ratio_*` config keys).
2. Token-level loss: normalise by the total token count of the batch
   (`loss_agg_mode = token_mean`); no KL term (`kl_coef = 0`).
3. Overlong reward shaping, added to the task reward, with L = |o_i|:

       R_length = 0                                   if L <= L_max - L_cache
                = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
                = -1                                  if L > L_max

4. Dynamic sampling: groups whose G rewards are all equal have zero advantage and
   no gradient; they are dropped and more prompts are sampled until the batch is
   full (the trainer does the re-sampling, bounded by `max_generation_rounds`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.grpo import GRPO
from algorithms.base import register_strategy
from engine.rollout import Rollout

DAPO_CLIP_RATIO_LOW = 0.2
DAPO_CLIP_RATIO_HIGH = 0.28


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int) -> Tensor:
    """DAPO's soft overlong punishment for completion lengths [B]; values in [-1, 0]."""
    if not 0 <= cache_length <= max_length:
        raise ValueError(f"need 0 <= overlong_cache_length <= overlong_max_length, got {cache_length}, {max_length}")
    lengths = lengths.float()
    expected = max_length - cache_length
    if cache_length == 0:
        return torch.where(lengths > max_length, -1.0, 0.0)
    penalty = (expected - lengths) / cache_length  # linear 0 -> -1 inside the cache window
    return penalty.clamp(min=-1.0, max=0.0)


@register_strategy("dapo")
class DAPO(GRPO):
    """Token unit + overlong shaping + dynamic sampling (clip-higher and token_mean come from the config)."""

    def __init__(
        self,
        advantage_scale: str = "group",
        advantage_eps: float = 1e-4,
        overlong_max_length: int | None = None,
        overlong_cache_length: int = 0,
        dynamic_sampling: bool = True,
    ):
        super().__init__(advantage_scale, advantage_eps)
        self.overlong_max_length = overlong_max_length
        self.overlong_cache_length = overlong_cache_length
        self.dynamic_sampling = dynamic_sampling

    def shape_rewards(self, rewards: Tensor, rollout: Rollout) -> Tensor:
        if self.overlong_max_length is None:
            return rewards
        penalty = overlong_penalty(rollout.completion_lengths, self.overlong_max_length, self.overlong_cache_length)
        return rewards + penalty.to(rewards.dtype)

    def keep_groups(self, rewards: Tensor, rollout: Rollout) -> Tensor | None:
        """Keep a group only when its rewards are not all equal; [P] bool in group order."""
        if not self.dynamic_sampling:
            return None
        _, group_index = torch.unique(rollout.group_ids, return_inverse=True)  # [B]
        num_groups = int(group_index.max()) + 1
        group_max = torch.full((num_groups,), float("-inf"), dtype=rewards.dtype, device=rewards.device).scatter_reduce(
            0, group_index, rewards, reduce="amax"
        )
        group_min = torch.full((num_groups,), float("inf"), dtype=rewards.dtype, device=rewards.device).scatter_reduce(
            0, group_index, rewards, reduce="amin"
        )
        return group_max > group_min
