"""The shared policy-gradient math: advantages, pooled ratios, clipped surrogate, KL, aggregation.

`policy_loss` is the whole objective of one micro-batch. Per token t of row i, with log-ratio
rho_{i,t} = log pi_theta(y_t) - log pi_old(y_t) (for a unit ratio, GSPO / Rank-GRPO: the mean rho of the
token's credit unit) and advantage A_{i,t}:

    r_{i,t}   = exp(clamp(rho_{i,t}, -20, 20))
    surr_{i,t} = -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A)          (PPO / GRPO / DAPO)
    dual clip (A < 0 only):  surr_{i,t} = min(surr_{i,t}, -c A)              (Ye et al. 2019, c > 1)
    loss_{i,t} = surr_{i,t} + beta * KL_{i,t}

KL estimators of KL(pi || pi_ref) from y ~ pi, d = log pi_ref(y) - log pi(y) (Schulman, "Approximating KL
divergence"):

    k1 = -d          k2 = d^2 / 2          k3 = exp(d) - d - 1  (>= 0, unbiased, low variance)

Aggregation over the masked tokens of one optimizer step (names as in verl; counts of the *whole* step):

    token_mean               sum_{i,t} m loss / sum_{i,t} m                       (DAPO)
    seq_mean_token_mean      (1/B) sum_i [ sum_t m loss / sum_t m ]                (GRPO paper, GSPO)
    seq_mean_token_sum_norm  (1/B) sum_i [ sum_t m loss ] / L_max                  (Dr. GRPO)
    seq_mean_unit_mean       (1/B) sum_i (1/N) sum_u [ mean_{t in u} loss ]        (Rank-GRPO paper)

Group advantages (GRPO; per-rank rewards [B, N] rank by rank), with the unbiased std:

    A_i = (R_i - mean_g R) / (std_g R + eps)     scale = group
    A_i = (R_i - mean_g R) / (std_B R + eps)     scale = batch (std over the whole batch)
    A_i =  R_i - mean_g R                        scale = none  (Dr. GRPO)
    A_i =  R_i - mean_{j != i} R_j               scale = leave_one_out  (RLOO, Ahmadian et al. 2024,
         = G / (G - 1) (R_i - mean_g R)                   arXiv 2402.14740, Eq. 7)

Details: docs/engine.md, section engine/loss.py; worked numbers: docs/losses.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.config import check, check_choice

LOG_RATIO_LIMIT = 20.0
AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_mean_unit_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none", "leave_one_out")
RATIO_LEVELS = ("token", "unit")


@dataclass
class LossConfig:
    """The loss settings (verl's names). Strategies declare their papers' values (algorithms/)."""

    clip_ratio_low: float = 0.2  # eps_low: the ratio is clipped below at 1 - eps_low
    clip_ratio_high: float = 0.2  # eps_high: ... and above at 1 + eps_high (DAPO's clip-higher: 0.28)
    clip_ratio_c: float | None = None  # dual clip for A < 0 (Ye et al. 2019); None = off
    loss_agg_mode: str = "token_mean"
    loss_max_length: int | None = None  # Dr. GRPO's constant L_max; None = the sampling budget max_new_tokens
    kl_loss_type: str = "k3"
    kl_coef: float = 0.0  # beta; > 0 needs a reference model

    def __post_init__(self) -> None:
        check(0 <= self.clip_ratio_low < 1, "clip_ratio_low", self.clip_ratio_low, "must be in [0, 1)")
        check(self.clip_ratio_high >= 0, "clip_ratio_high", self.clip_ratio_high, "must be >= 0")
        check(self.clip_ratio_c is None or self.clip_ratio_c > 1, "clip_ratio_c", self.clip_ratio_c,
              "must be > 1 (or none to switch the dual clip off)")
        check_choice("loss_agg_mode", self.loss_agg_mode, AGGREGATION_MODES)
        check(self.loss_max_length is None or self.loss_max_length >= 1, "loss_max_length", self.loss_max_length,
              "must be >= 1 (or none for max_new_tokens)")
        check_choice("kl_loss_type", self.kl_loss_type, KL_ESTIMATORS)
        check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")


# --- advantages ---
def group_advantages(rewards: Tensor, group_ids: Tensor, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages of rewards [B] or per-rank rewards [B, N]; group_ids [B]: prompt index of each
    row (any integers, unsorted). Std is unbiased (n - 1); a group of one sample gets advantage 0 (every scale)."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose one of {ADVANTAGE_SCALES}")
    if rewards.shape[0] != group_ids.shape[0]:
        raise ValueError(f"rewards have {rewards.shape[0]} rows but group_ids {group_ids.shape[0]}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; fix the reward function (or let the trainer skip the step)")
    rewards = rewards.double()
    squeeze = rewards.dim() == 1
    if squeeze:
        rewards = rewards[:, None]  # [B, 1]
    _, group_index = torch.unique(group_ids, return_inverse=True)  # [B] in 0..num_groups-1
    num_groups = int(group_index.max()) + 1
    index = group_index[:, None].expand_as(rewards)  # [B, N]
    counts = torch.zeros(num_groups, 1, dtype=rewards.dtype, device=rewards.device)
    counts.index_add_(0, group_index, torch.ones_like(rewards[:, :1]))  # [Gp, 1]
    sums = torch.zeros(num_groups, rewards.shape[1], dtype=rewards.dtype, device=rewards.device)
    sums.scatter_add_(0, index, rewards)  # [Gp, N]
    group_mean = (sums / counts)[group_index]  # [B, N]
    centred = rewards - group_mean  # [B, N]
    if scale == "none":
        advantages = centred
    elif scale == "leave_one_out":
        sizes = counts[group_index]  # [B, 1]
        advantages = centred * torch.where(sizes > 1, sizes / (sizes - 1).clamp(min=1), torch.zeros_like(sizes))
    elif scale == "group":
        squares = torch.zeros_like(sums).scatter_add_(0, index, centred**2)  # [Gp, N]
        group_std = (squares / (counts - 1).clamp(min=1)).sqrt()[group_index]  # [B, N]
        advantages = centred / (group_std + eps)
    else:  # batch
        batch_std = (rewards.std(dim=0, unbiased=True, keepdim=True) if rewards.shape[0] > 1
                     else torch.zeros_like(rewards[:1]))
        advantages = centred / (batch_std + eps)
    advantages = advantages.float()
    return advantages[:, 0] if squeeze else advantages


def group_reward_spread(values: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """[P] bool, in group order: whether any unit's reward differs inside each group of rows.
    values, mask [B, U]; group_ids [B]. No spread means every advantage of the group is 0."""
    values = values.masked_fill(~mask, 0.0)  # [B, U]
    _, group_index = torch.unique(group_ids, return_inverse=True)  # [B]
    index = group_index[:, None].expand_as(values)
    num_groups = int(group_index.max()) + 1
    high = values.new_full((num_groups, values.shape[1]), float("-inf")).scatter_reduce(0, index, values, "amax")
    low = values.new_full((num_groups, values.shape[1]), float("inf")).scatter_reduce(0, index, values, "amin")
    return (high > low).any(dim=1)


# --- pooling a per-token quantity over credit units ---
def _scatter_over_units(values: Tensor, unit_ids: Tensor, num_units: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sum and count of `values` per (row, unit): (sums [B * num_units], counts [B * num_units], flat_index [B, T]),
    flat_index = row * num_units + unit locating each token's slot. Tokens with unit id -1 add nothing."""
    if values.shape != unit_ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and unit_ids {tuple(unit_ids.shape)} differ in shape")
    if unit_ids.numel() and int(unit_ids.max()) >= num_units:
        raise ValueError(f"unit id {int(unit_ids.max())} out of range for num_units={num_units}")
    rows = values.shape[0]
    has_unit = (unit_ids >= 0).to(values.dtype)  # [B, T]
    row_offsets = torch.arange(rows, device=values.device)[:, None] * num_units  # [B, 1]
    flat_index = row_offsets + unit_ids.clamp(min=0)  # [B, T]
    slots = torch.zeros(rows * num_units, dtype=values.dtype, device=values.device)
    sums = slots.index_add(0, flat_index.reshape(-1), (values * has_unit).reshape(-1))
    counts = slots.index_add(0, flat_index.reshape(-1), has_unit.reshape(-1))
    return sums, counts, flat_index


def unit_mean(values: Tensor, unit_ids: Tensor, num_units: int) -> Tensor:
    """Masked mean of `values` [B, T] inside each (row, unit), broadcast back to the unit's tokens; unit_ids [B, T]
    long in 0..num_units-1, or -1 for tokens without credit (they get 0). Gradient weight 1 / |unit| per token."""
    sums, counts, flat_index = _scatter_over_units(values, unit_ids, num_units)
    means = sums / counts.clamp(min=1)  # [B * num_units]
    return means[flat_index] * (unit_ids >= 0)  # [B, T]


def unit_sizes(unit_ids: Tensor, num_units: int) -> Tensor:
    """Number of tokens in each token's (row, unit), [B, T]; 0 where unit_ids == -1."""
    ones = torch.ones(unit_ids.shape, dtype=torch.float32, device=unit_ids.device)
    _, counts, flat_index = _scatter_over_units(ones, unit_ids, num_units)
    return counts[flat_index] * (unit_ids >= 0)


# --- surrogate and KL ---
def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, clip_ratio_low: float, clip_ratio_high: float,
                      clip_ratio_c: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss -min(r A, clip(r) A) (with optional dual clip) of log_ratio, advantages [B, T]: (loss
    [B, T], clipped [B, T] bool), `clipped` marking tokens whose gradient the clip removed (or the dual clip capped)."""
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))  # [B, T]
    clipped_ratio = ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    unclipped_loss = -ratio * advantages
    clipped_loss = -clipped_ratio * advantages
    loss = torch.maximum(unclipped_loss, clipped_loss)  # = -min(r A, clip(r) A)
    clipped = clipped_loss > unclipped_loss
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        cap = -clip_ratio_c * advantages  # bound on the loss of negative-advantage tokens
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_clipped, cap, loss)
        clipped = clipped | dual_clipped
    return loss, clipped


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi; [B, T]."""
    delta = (ref_logprobs - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # log pi_ref - log pi
    if kind == "k1":
        return -delta
    if kind == "k2":
        return 0.5 * delta**2
    if kind == "k3":
        return torch.exp(delta) - delta - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


# --- aggregation ---
def aggregate(loss: Tensor, mask: Tensor, mode: str, *, num_tokens: float | None = None,
              num_sequences: float | None = None, max_length: int | None = None, unit_ids: Tensor | None = None,
              num_units: int | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar (the modes: module docstring). `num_tokens` / `num_sequences`:
    mask sum and row count of the *whole* optimizer step (default: this batch's); `max_length`: Dr. GRPO's L_max;
    `unit_ids` / `num_units`: for `seq_mean_unit_mean` (N = num_units scored units; docs/engine.md)."""
    mask = mask.to(loss.dtype)
    if num_tokens is None:
        num_tokens = float(mask.sum())
    if num_sequences is None:
        num_sequences = float(loss.shape[0])
    masked_loss = loss * mask
    if mode == "token_mean":
        return masked_loss.sum() / max(num_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        per_sequence = masked_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
        return per_sequence.sum() / max(num_sequences, 1.0)
    if mode == "seq_mean_token_sum_norm":
        if not max_length:
            raise ValueError("seq_mean_token_sum_norm needs max_length (Dr. GRPO's constant L_max)")
        return masked_loss.sum() / (max(num_sequences, 1.0) * max_length)
    if mode == "seq_mean_unit_mean":
        if unit_ids is None or not num_units:
            raise ValueError("seq_mean_unit_mean needs unit_ids and num_units from the strategy")
        unit_ids = torch.where(mask.bool(), unit_ids, torch.full_like(unit_ids, -1))
        # Weighting each token by 1/|unit| turns the token sum into a sum of unit means.
        sizes = unit_sizes(unit_ids, max(int(unit_ids.max()) + 1, 1) if unit_ids.numel() else 1)  # [B, T]
        per_token_weight = torch.where(sizes > 0, 1.0 / sizes.clamp(min=1), torch.zeros_like(sizes))
        return (masked_loss * per_token_weight).sum() / (max(num_sequences, 1.0) * num_units)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {AGGREGATION_MODES}")


# --- the objective of one micro-batch ---
def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, config: LossConfig, *,
                unit_ids: Tensor | None = None, ratio_level: str = "token", num_units: int | None = None,
                ref_logprobs: Tensor | None = None, num_tokens: float | None = None,
                num_sequences: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped-ratio policy loss with KL, aggregated; returns (loss, metrics).

    logprobs [B, T] (grad flows), old_logprobs, advantages, mask (bool), ref_logprobs (when kl_coef > 0) [B, T];
    unit_ids [B, T] long (-1 = no unit) for ratio_level "unit" (the unit's geometric-mean ratio; "token": each
    token its own) and for seq_mean_unit_mean (divisor `num_units`). `num_tokens` / `num_sequences`: the whole
    optimizer step's normalisers (default: this batch's). Metrics are detached sums over the masked tokens, to be
    added up over micro-batches: "tokens", "clipped_tokens", "kl_sum", "ratio_sum", "ratio_max", "ratio_min".
    """
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    mask = mask.bool()
    if not logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, advantages "
                         f"{tuple(advantages.shape)} and mask {tuple(mask.shape)} must all be [B, T]")
    log_ratio = (logprobs - old_logprobs).masked_fill(~mask, 0.0)  # [B, T]; zero on padding before any exp
    if ratio_level == "unit" or config.loss_agg_mode == "seq_mean_unit_mean":
        if unit_ids is None:
            raise ValueError("a unit ratio and seq_mean_unit_mean need unit_ids [B, T] from the strategy")
        unit_ids = unit_ids.masked_fill(~mask, -1)  # [B, T]
    if ratio_level == "unit":
        num_bins = int(unit_ids.max()) + 1 if unit_ids.numel() else 1
        log_ratio = unit_mean(log_ratio, unit_ids, max(num_bins, 1))  # [B, T] log geometric-mean ratio of the unit
    per_token, clipped = clipped_surrogate(log_ratio, advantages, config.clip_ratio_low, config.clip_ratio_high,
                                           config.clip_ratio_c)  # [B, T]
    kl_sum = torch.zeros((), device=logprobs.device)
    if config.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs [B, T] from a reference model")
        kl = kl_penalty(logprobs, ref_logprobs, config.kl_loss_type)  # [B, T]
        per_token = per_token + config.kl_coef * kl
        kl_sum = (kl.detach() * mask).sum()
    loss = aggregate(per_token, mask, config.loss_agg_mode, num_tokens=num_tokens, num_sequences=num_sequences,
                     max_length=config.loss_max_length, unit_ids=unit_ids, num_units=num_units)
    ratio = log_ratio.detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()  # [B, T]
    any_token = mask.any()  # masked reductions, not ratio[mask]: no host sync, the metrics stay on the device
    metrics = {
        "tokens": mask.sum().float(), "clipped_tokens": (clipped & mask).sum().float(), "kl_sum": kl_sum,
        "ratio_sum": (ratio * mask).sum(),
        "ratio_max": torch.where(any_token, ratio.masked_fill(~mask, -torch.inf).amax(), 1.0),
        "ratio_min": torch.where(any_token, ratio.masked_fill(~mask, torch.inf).amin(), 1.0),
    }
    return loss, metrics
