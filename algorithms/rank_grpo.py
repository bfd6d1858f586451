"""Rank-GRPO: the rank (list item) credit unit with per-rank rewards and advantages.

Zhu, Steck, Liang, He, Ostuni, Li, Kallus 2025 (UVA, Netflix Research, Cornell),
"Rank-GRPO: Training LLM-based Conversational Recommender Systems with Reinforcement
Learning" (from v4: "ConvRec-R1: ..."), arXiv 2510.20150, ICLR 2026. Official code:
github.com/yaochenzhu/Rank-GRPO (a patched copy of TRL 0.21 `GRPOTrainer`,
`libs/trl/rank_grpo_trainer.py`). Notes: shared/reference/rank_grpo.md §1.

A completion is a list of N lines "Title (Year)" (N = `list_length`, 20 in the paper),
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

   They arrive here as `rewards [B, N]`.

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
   reward ranks (notes §1.1, §1.11.3).

5. Rank ratio: the geometric mean of the token ratios of rank k, i.e. the ratio of
   the length-normalised item probabilities,

       w_{i,k}(theta) = ( prod_{t in k} pi_theta(y_t | ...) / pi_old(y_t | ...) )^(1/|y_i^(k)|)
                      = exp( mean_{t in k} [log pi_theta(y_t) - log pi_old(y_t)] )

   with the newline and EOS tokens inside their rank and all overflow tokens in one
   bin (`pool_log_ratio`). Autograd gives every token of rank k the weight 1/|y^(k)|.

6. Objective (paper, maximised; the engine minimises its negative):

       J(theta) = E_{x, {y_i} ~ pi_old} [ (1/(G N)) sum_{i=1}^{G} sum_{k=1}^{N}
                      min( w_{i,k} A_{i,k}, clip(w_{i,k}, 1 - eps_low, 1 + eps_high) A_{i,k} ) ]

   Aggregation (`loss_agg_mode`, set in the experiment config):
       seq_mean_unit_mean   the paper's (1/(G N)) sum_i sum_k, each rank's loss the mean
                            over its tokens; `num_units = N` is the divisor. The overflow
                            bin N is not one of the N ranks, but its unit mean is still
                            added (so overflow penalties reach the loss).
       token_mean           the official code (TRL "bnpo"): sum over all tokens / token
                            count, i.e. each rank weighted by its token length.
   The code also adds beta * k3 KL against the frozen SFT model (beta = 1e-3) and uses
   eps_low = 0.06, eps_high = 0.08; those are learner settings (clip_ratio_low/high,
   kl_coef, kl_loss_type) of the experiment config, not of this strategy.

   On-policy (mu = 1) every ratio is exactly 1 and the update is token-level REINFORCE
   with per-rank advantages; the geometric-mean ratio matters only for mu > 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.base import Strategy, register_strategy
from engine.loss import group_advantages, unit_mean
from engine.rollout import Rollout

RANK_GRPO_CLIP_RATIO_LOW = 0.06
RANK_GRPO_CLIP_RATIO_HIGH = 0.08
RANK_GRPO_KL_COEF = 1e-3
LENGTH_SHAPING = 0.1  # the code's fixed +-0.1 (getattr defaults; not in GRPOConfig)


def newline_counts(tokenizer) -> Tensor:
    """Number of "\\n" characters in the text of each vocabulary id, [V] long; 0 for special tokens.

    Each id is decoded alone, so merged tokens (")\\n", "\\n\\n") count every newline
    they hold. Byte pieces that are not valid UTF-8 on their own decode to U+FFFD,
    never to a newline (0x0A is a one-byte character), so they count 0.
    """
    vocab_size = len(tokenizer)
    texts = tokenizer.batch_decode(
        [[token_id] for token_id in range(vocab_size)],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    counts = torch.tensor([text.count("\n") for text in texts], dtype=torch.long)  # [V]
    special_ids = [i for i in tokenizer.all_special_ids if 0 <= i < vocab_size]
    if special_ids:
        counts[torch.tensor(special_ids)] = 0
    return counts


def rank_ids(completion_ids: Tensor, completion_mask: Tensor, counts: Tensor, list_length: int) -> Tensor:
    """Rank id of each completion token: newlines strictly before it, clamped to N; -1 on padding. [B, T]"""
    mask = completion_mask.bool()  # [B, T]
    in_vocab = (completion_ids >= 0) & (completion_ids < counts.numel())  # ids beyond the tokenizer: no text
    token_newlines = counts[completion_ids.clamp(0, counts.numel() - 1)] * (in_vocab & mask)  # [B, T]
    before = token_newlines.cumsum(dim=1) - token_newlines  # [B, T] exclusive cumsum
    ranks = before.clamp(max=list_length)  # overflow bin N
    return torch.where(mask, ranks, torch.full_like(ranks, -1))


def last_token_positions(completion_mask: Tensor) -> Tensor:
    """Column of the last real token of each row, [B] long (0 for empty rows)."""
    positions = torch.arange(completion_mask.shape[1], device=completion_mask.device)  # [T]
    return (positions[None, :] * completion_mask.bool()).max(dim=1).values


@register_strategy("rank_grpo")
class RankGRPO(Strategy):
    """Rank credit unit: one advantage and one geometric-mean ratio per list item."""

    def __init__(
        self,
        advantage_scale: str = "group",
        advantage_eps: float = 1e-4,
        list_length: int = 10,
        length_shaping: bool = True,
        tokenizer=None,
    ):
        super().__init__(advantage_scale, advantage_eps)
        if list_length < 1:
            raise ValueError(f"list_length must be >= 1, got {list_length}")
        self.list_length = list_length
        self.num_units = list_length  # N ranks for seq_mean_unit_mean; overflow bin N comes on top
        self.length_shaping = length_shaping
        self.tokenizer = tokenizer
        self._newline_cache: tuple | None = None  # (tokenizer, vocab size, {device: counts [V]})

    # --- token -> rank ---------------------------------------------------
    def newline_counts(self, tokenizer, device: torch.device) -> Tensor:
        """`newline_counts(tokenizer)` [V], computed once per tokenizer and cached per device."""
        cache = self._newline_cache
        # Holding the tokenizer object (not only its id()) keeps the key from being reused.
        if cache is None or cache[0] is not tokenizer or cache[1] != len(tokenizer):
            cache = (tokenizer, len(tokenizer), {torch.device("cpu"): newline_counts(tokenizer)})
            self._newline_cache = cache
        per_device = cache[2]
        if device not in per_device:
            per_device[device] = per_device[torch.device("cpu")].to(device)
        return per_device[device]

    def unit_ids(self, rollout: Rollout, tokenizer=None) -> Tensor:
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError(
                "rank_grpo segments completions into list items by counting newlines, "
                "so it needs the tokenizer: pass tokenizer= to RankGRPO or to unit_ids"
            )
        counts = self.newline_counts(tokenizer, rollout.completion_ids.device)  # [V]
        return rank_ids(rollout.completion_ids, rollout.completion_mask, counts, self.list_length)  # [B, T]

    # --- advantages --------------------------------------------------------
    def advantages(self, rewards: Tensor, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        n = self.list_length
        batch_size = rollout.completion_ids.shape[0]
        if rewards.dim() == 1:
            raise ValueError(
                f"rank_grpo needs per-rank rewards [B, N] = [{batch_size}, {n}]; got one reward per "
                f"completion, shape {tuple(rewards.shape)}. Use grpo (or gspo) for sequence rewards, "
                "or give the task a per-rank reward (exp_inf / log_decay)"
            )
        if rewards.dim() != 2 or rewards.shape[0] != batch_size or rewards.shape[1] != n:
            raise ValueError(
                f"rank_grpo rewards must be [B, N] = [{batch_size}, {n}] (list_length = {n}); "
                f"got shape {tuple(rewards.shape)}. Make the task's list length equal list_length"
            )
        if unit_ids.shape != rollout.completion_ids.shape:
            raise ValueError(
                f"unit_ids {tuple(unit_ids.shape)} and completion_ids {tuple(rollout.completion_ids.shape)} differ"
            )
        rank_advantages = group_advantages(  # [B, N], normalised rank by rank across each group
            rewards, rollout.group_ids, self.advantage_scale, self.advantage_eps
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

        if self.length_shaping:
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

    # --- ratio ---------------------------------------------------------------
    def pool_log_ratio(self, log_ratio: Tensor, unit_ids: Tensor) -> Tensor:
        # log w_{i,k} = mean of the token log-ratios of rank k (bins 0..N-1, overflow bin N),
        # broadcast back to the rank's tokens; -1 tokens get 0.
        return unit_mean(log_ratio, unit_ids, self.list_length + 1)  # [B, T]
