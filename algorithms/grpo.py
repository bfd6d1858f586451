"""GRPO (token unit) and GSPO (sequence unit).

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300). For a prompt q, G completions
o_1..o_G are sampled from pi_old and scored with rewards R_i. Every token of o_i shares
the group-relative advantage

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)

and has its own importance ratio r_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(...).
The objective (maximised; the engine minimises its negative) is

    J = E[ (1/G) sum_i (1/|o_i|) sum_t min(r_{i,t} A_i, clip(r_{i,t}, 1-eps_low, 1+eps_high) A_i) ]
        - beta * KL(pi_theta || pi_ref)

which is `loss_agg_mode = seq_mean_token_mean`. Dr. GRPO (Liu et al. 2025, arXiv
2503.20783) is the same strategy with `advantage_scale = none` and
`loss_agg_mode = seq_mean_token_sum_norm`.

GSPO (Zheng et al. 2025, Qwen, arXiv 2507.18071) moves the ratio to the sequence:

    s_i = (pi_theta(o_i|q) / pi_old(o_i|q))^(1/|o_i|) = exp( (1/|o_i|) sum_t log r_{i,t} )
    J   = E[ (1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i) ]

so the whole sequence is clipped together. Its gradient is s_i A_i (1/|o_i|) sum_t
grad log pi_theta(o_{i,t}): every token gets the same weight 1/|o_i|, which is what
autograd gives through the masked mean below. The paper's clip range is
eps_low = 3e-4, eps_high = 4e-4 with sequence-mean aggregation (`seq_mean_token_mean`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.base import Strategy, register_strategy
from engine.loss import unit_mean
from engine.rollout import Rollout

GSPO_CLIP_RATIO_LOW = 3e-4
GSPO_CLIP_RATIO_HIGH = 4e-4


def token_unit_ids(completion_mask: Tensor) -> Tensor:
    """Every completion token is its own unit: its position, -1 on padding. [B, T]"""
    positions = torch.arange(completion_mask.shape[1], device=completion_mask.device)  # [T]
    return torch.where(completion_mask.bool(), positions[None, :], torch.full_like(positions[None, :], -1))


@register_strategy("grpo")
class GRPO(Strategy):
    """Token credit unit: per-token ratio, one advantage per sequence."""

    def unit_ids(self, rollout: Rollout, tokenizer) -> Tensor:
        return token_unit_ids(rollout.completion_mask)  # [B, T]

    def advantages(self, rewards: Tensor, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        return self.sequence_advantages(rewards, rollout)  # [B, T]

    def pool_log_ratio(self, log_ratio: Tensor, unit_ids: Tensor) -> Tensor:
        return log_ratio * (unit_ids >= 0)  # identity on real tokens


@register_strategy("gspo")
class GSPO(Strategy):
    """Sequence credit unit: one length-normalised ratio and one advantage per sequence."""

    num_units = 1

    def unit_ids(self, rollout: Rollout, tokenizer) -> Tensor:
        mask = rollout.completion_mask.bool()
        return torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -1, dtype=torch.long))

    def advantages(self, rewards: Tensor, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        return self.sequence_advantages(rewards, rollout)  # [B, T]

    def pool_log_ratio(self, log_ratio: Tensor, unit_ids: Tensor) -> Tensor:
        # log s_i = masked mean over the row of log r_{i,t}, broadcast to the row's tokens.
        return unit_mean(log_ratio, unit_ids, num_units=1)  # [B, T]
