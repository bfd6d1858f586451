"""Rank-GRPO: the rank (list item) credit unit with per-rank rewards and advantages.

Zhu, Steck, Liang, He, Ostuni, Li, Kallus 2025 (UVA, Netflix Research, Cornell),
"Rank-GRPO: Training LLM-based Conversational Recommender Systems with Reinforcement
Learning" (from v4: "ConvRec-R1: ..."), arXiv 2510.20150, ICLR 2026. Official code:
github.com/yaochenzhu/Rank-GRPO (a patched copy of TRL 0.21 `GRPOTrainer`,
`libs/trl/rank_grpo_trainer.py`); recrl's summary of both: docs/rank_grpo.md.

A completion is a list of N lines "Title (Year)" (N = the task's list length, 20 in the paper),
separated by single newlines, EOS right after item N. Each list item k is an action
with its own reward, advantage and importance ratio.

1. Token -> rank segmentation (code `_segment_items_from_tokens`). The rank id of a
   completion token is the number of "\\n" characters in the tokens strictly before it,
   so a newline token belongs to the item it ends, a merged token such as ")\\n" too, a
   "\\n\\n" token advances the id by 2, and the EOS token belongs to the last line.
   Ids >= N are overflow and share one bin N; padding gets -1:

       s(t) = min( sum_{t' < t} newlines(y_t'), N )                    unit_ids [B, T]

2. Rank rewards, from the per-rank hits rel_{i,k} in {0, 1} (rewards/ranking.py;
   k = 1..N; duplicates, seen and out-of-catalog items are 0). Only the causal suffix
   of DCG is credited to rank k:

       exp_inf   r_{i,k} = rel_{i,k}                                 (default, best)
       exp_Gamma r_{i,k} = sum_{j>=k} rel_{i,j} / Gamma^(j-k)        (paper only)
       log_decay r_{i,k} = sum_{j>=k} rel_{i,j} / log2(j+1)           (absolute position j)

   They arrive here as `rewards.values [B, N]`; N is taken from them.

3. Per-rank advantage: normalised rank by rank across the G samples of a prompt
   (not across the ranks of one list), unbiased std, eps added to the std:

       A_{i,k} = (r_{i,k} - mean_g r_{.,k}) / (std_g r_{.,k} + 1e-4)   [B, N]

4. Token advantage (code, lines 1812-1851): adv_t = A_{i, s(t)} for s(t) < N, 0 for
   overflow tokens; the EOS token gets base 0. Length shaping (`length_shaping`, on
   in the code, only hinted at in the paper; not group-normalised) then adds
       -0.1 to every overflow token (an EOS after a trailing newline behind item N
            is an overflow token and gets only this);
       +0.1 to the EOS token when it sits in rank N-1 (exactly N items);
       -0.1 to the EOS token when it sits in a rank < N-1 (stopped early);
   and nothing to the EOS of truncated rows (they have none). As in the code, "exactly N
   items" means "EOS in rank N-1": N-1 items plus a trailing newline also get the +0.1,
   and a blank line ("\\n\\n") uses up a rank, shifting later tokens against the parsed
   reward ranks (docs/rank_grpo.md §1).

5. Rank ratio: the geometric mean of the token ratios of rank k, i.e. the ratio of
   the length-normalised item probabilities,

       w_{i,k}(theta) = ( prod_{t in k} pi_theta(y_t | ...) / pi_old(y_t | ...) )^(1/|y_i^(k)|)
                      = exp( mean_{t in k} [log pi_theta(y_t) - log pi_old(y_t)] )

   with the newline and EOS tokens inside their rank and all overflow tokens in one
   bin (`pool_log_ratio`). Autograd gives every token of rank k the weight 1/|y^(k)|.

6. Objective (paper, maximised; the engine minimises its negative):

       J(theta) = E_{x, {y_i} ~ pi_old} [ (1/(G N)) sum_{i=1}^{G} sum_{k=1}^{N}
                      min( w_{i,k} A_{i,k}, clip(w_{i,k}, 1 - eps_low, 1 + eps_high) A_{i,k} ) ]

   Aggregation (`learner.loss_agg_mode`):
       seq_mean_unit_mean   the paper's (1/(G N)) sum_i sum_k, each rank's loss the mean
                            over its tokens; `num_units = N` is the divisor. The overflow
                            bin N is not one of the N ranks, but its unit mean is still
                            added (so overflow penalties reach the loss). The default.
       token_mean           the official code (TRL "bnpo"): sum over all tokens / token
                            count, i.e. each rank weighted by its token length.
   The code also adds beta * k3 KL against the frozen SFT model (beta = 1e-3) and uses
   eps_low = 0.06, eps_high = 0.08: the defaults below.

   On-policy (mu = 1) every ratio is exactly 1 and the update is token-level REINFORCE
   with per-rank advantages; the geometric-mean ratio matters only for mu > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.base import LineSegmenter, Strategy, StrategyConfig
from engine.loss import group_advantages
from engine.rollout import Rollout

LENGTH_SHAPING = 0.1  # the code's fixed +-0.1 (getattr defaults; not in GRPOConfig)


@dataclass
class RankGRPOConfig(StrategyConfig):
    length_shaping: bool = True  # the code's +-0.1 on EOS and overflow tokens (item 4 above)


def last_token_positions(completion_mask: Tensor) -> Tensor:
    """Column of the last real token of each row, [B] long (0 for empty rows)."""
    positions = torch.arange(completion_mask.shape[1], device=completion_mask.device)  # [T]
    return (positions[None, :] * completion_mask.bool()).max(dim=1).values


class RankGRPO(Strategy):
    """Rank credit unit: one advantage and one geometric-mean ratio per list item."""

    name = "rank_grpo"
    Config = RankGRPOConfig
    ratio_level = "unit"  # overflow tokens share the bin N; -1 tokens get 0
    reward_shapes = ("ranks",)
    defaults = {"learner.clip_ratio_low": 0.06, "learner.clip_ratio_high": 0.08, "learner.kl_coef": 1e-3,
                "learner.kl_loss_type": "k3", "learner.loss_agg_mode": "seq_mean_unit_mean"}

    def __init__(self, config: RankGRPOConfig | None = None, tokenizer=None, task=None):
        super().__init__(config, tokenizer, task)
        self.segment = LineSegmenter(tokenizer)

    def num_units(self, rewards) -> int:
        return rewards.values.shape[1]  # N ranks; the overflow bin N comes on top

    # --- token -> rank ---------------------------------------------------
    def unit_ids(self, rollout: Rollout, rewards) -> Tensor:
        return self.segment(rollout.completion_ids, rollout.completion_mask, max_line=self.num_units(rewards))

    # --- advantages --------------------------------------------------------
    def advantages(self, rewards, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        n = self.num_units(rewards)
        if n < 2 or not bool(rewards.mask.all()):
            raise ValueError(
                f"rank_grpo needs per-rank rewards [B, N], N >= 2, for every rank (N = the list length); got shape "
                f"{tuple(rewards.values.shape)}{'' if bool(rewards.mask.all()) else ' with masked ranks'}. Use grpo "
                "(or gspo) for one reward per completion, or give the task a per-rank reward (exp_inf / log_decay)"
            )
        rank_advantages = group_advantages(  # [B, N], normalised rank by rank across each group
            rewards.values, rollout.group_ids, self.config.advantage_scale, self.config.advantage_eps
        )
        overflow_column = torch.zeros_like(rank_advantages[:, :1])  # [B, 1]
        with_overflow = torch.cat([rank_advantages, overflow_column], dim=1)  # [B, N + 1]
        has_rank = unit_ids >= 0  # [B, T]
        token_advantages = with_overflow.gather(1, unit_ids.clamp(min=0)) * has_rank  # [B, T]

        # The EOS token: last real token of a row that ended with EOS.
        mask = rollout.completion_mask.bool() & has_rank  # [B, T]
        eos_rows = rollout.ended_with_eos.bool() & mask.any(dim=1)  # [B]
        eos_position = last_token_positions(mask)  # [B]
        columns = torch.arange(mask.shape[1], device=mask.device)  # [T]
        is_eos = eos_rows[:, None] & (columns[None, :] == eos_position[:, None])  # [B, T]
        token_advantages = token_advantages.masked_fill(is_eos, 0.0)

        if self.config.length_shaping:
            eos_rank = unit_ids.gather(1, eos_position[:, None]).squeeze(1)  # [B]
            overflow = unit_ids == n  # [B, T], EOS after a trailing newline included
            exact = eos_rows & (eos_rank == n - 1)  # [B] EOS right after item N
            early = eos_rows & (eos_rank < n - 1)  # [B] fewer than N items
            eos_bonus = torch.where(exact, LENGTH_SHAPING, 0.0) + torch.where(early, -LENGTH_SHAPING, 0.0)  # [B]
            token_advantages = (
                token_advantages
                - LENGTH_SHAPING * overflow
                + is_eos * eos_bonus[:, None].to(token_advantages.dtype)
            )
        return token_advantages.float()  # [B, T]
