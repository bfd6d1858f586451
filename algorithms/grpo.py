"""GRPO (token unit) and GSPO (sequence unit).

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, §4.1, Eq. 3). For a prompt q, G
completions o_1..o_G are sampled from pi_old and scored with rewards R_i. Every token of
o_i shares the group-relative advantage

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)

and has its own importance ratio r_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(...).
The objective (maximised; the engine minimises its negative) is

    J = E[ (1/G) sum_i (1/|o_i|) sum_t min(r_{i,t} A_i, clip(r_{i,t}, 1-eps, 1+eps) A_i) ]
        - beta * KL(pi_theta || pi_ref)

which is `loss_agg_mode = seq_mean_token_mean`, with the unbiased k3 estimator of the KL
(Eq. 4) and beta = 0.04 (§4.2). Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) is the same
strategy with `strategy.advantage_scale = none` and `learner.loss_agg_mode =
seq_mean_token_sum_norm`.

GSPO (Zheng et al. 2025, Qwen, arXiv 2507.18071, Eq. 5-7) moves the ratio to the sequence:

    s_i = (pi_theta(o_i|q) / pi_old(o_i|q))^(1/|o_i|) = exp( (1/|o_i|) sum_t log r_{i,t} )
    J   = E[ (1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i) ]

so the whole sequence is clipped together: one unit per row, `ratio_level = "unit"`. Its
gradient is s_i A_i (1/|o_i|) sum_t grad log pi_theta(o_{i,t}): every token gets the same
weight 1/|o_i|, which is what autograd gives through the unit mean. The paper's clip range
is eps_low = 3e-4, eps_high = 4e-4 (§5.1), sequence-mean aggregation, no KL.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.base import Strategy, token_unit_ids
from engine.loss import group_advantages
from engine.rollout import Rollout


class GRPO(Strategy):
    """Token credit unit: per-token ratio, one advantage per sequence."""

    name = "grpo"
    reward_shapes = ("sequence", "item_head")  # a path's ranking reward is one per completion too (extras unused)
    defaults = {"learner.clip_ratio_low": 0.2, "learner.clip_ratio_high": 0.2,
                "learner.loss_agg_mode": "seq_mean_token_mean", "learner.kl_coef": 0.04, "learner.kl_loss_type": "k3"}

    def unit_ids(self, rollout: Rollout, rewards) -> Tensor:
        return token_unit_ids(rollout.completion_mask)  # [B, T]

    def advantages(self, rewards, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        """Group-normalised sequence rewards [B] broadcast to every completion token, [B, T]."""
        if rewards.values.shape[1] != 1:
            raise ValueError(
                f"{self.name} needs one reward per completion ([B] or [B, 1]); got shape "
                f"{tuple(rewards.values.shape)}. Per-unit rewards belong to a unit strategy such as rank_grpo"
            )
        advantages = group_advantages(rewards.values[:, 0], rollout.group_ids, self.config.advantage_scale,
                                      self.config.advantage_eps)  # [B]
        return advantages[:, None] * rollout.completion_mask  # [B, T]


class GSPO(GRPO):
    """Sequence credit unit: one length-normalised ratio and one advantage per sequence (GRPO's advantages)."""

    name = "gspo"
    ratio_level = "unit"
    defaults = {"learner.clip_ratio_low": 3e-4, "learner.clip_ratio_high": 4e-4,
                "learner.loss_agg_mode": "seq_mean_token_mean", "learner.kl_coef": 0.0}

    def unit_ids(self, rollout: Rollout, rewards) -> Tensor:
        mask = rollout.completion_mask.bool()  # [B, T]: unit 0 = the whole row
        return torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -1, dtype=torch.long))

    def num_units(self, rewards) -> int:
        return 1
