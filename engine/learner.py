"""One policy update over a rollout batch.

    for epoch in 1..ppo_epochs (mu):
        for each of `mini_batches` slices of the rows:            -> one optimizer step
            for each micro-batch of `micro_batch_size` rows:       -> gradient accumulation
                logprobs   = recompute(policy)                      [b, T]
                log_ratio  = logprobs - old_logprobs                [b, T]
                pooled     = strategy.pool_log_ratio(log_ratio)     [b, T]  (credit unit)
                loss_t     = clipped_surrogate(pooled, A) + kl_coef * KL(logprobs, ref_logprobs)
                loss       = aggregate(loss_t, mask, mode, normalisers of the whole slice)
                loss.backward()
            clip grad norm, AdamW step, LR schedule step

Old log-probs. With one epoch and one mini-batch the update is on-policy: old
log-probs are `logprobs.detach()`, so every ratio is exactly 1 and the gradient is
A * grad log pi. Otherwise the policy's log-probs are recomputed once before the first
update (no grad) and cached, so later passes see the true ratio pi_theta / pi_old.

Normalisers. `aggregate` gets the token and row counts of the whole optimizer step
(the mini-batch), so the summed micro-batch losses equal the one-batch loss and the
accumulated gradient equals the one-big-batch gradient.

Non-finite guard: if the loss or the gradient norm is NaN/inf, the optimizer step is
skipped (weights untouched) and counted in the metrics.

Reference model. Its log-probs are computed under `torch.inference_mode` (no autograd
bookkeeping at all). With `reference_offload` it lives in CPU memory and visits the
policy's device only for that forward, which frees a full copy of the weights on the
GPU for the price of two host-device copies per update.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.logprobs import completion_logprobs
from engine.loss import aggregate, clipped_surrogate, kl_penalty
from engine.rollout import Rollout

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class LearnerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 8
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = None
    loss_agg_mode: str = "token_mean"
    loss_max_length: int | None = None  # Dr. GRPO's constant L_max; None = this batch's width (set it to max_new_tokens)
    kl_loss_type: str = "k3"
    kl_coef: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1  # optimizer steps the schedule spans
    logits_chunk_size: int = 128
    bf16_autocast: bool = True  # on CUDA only; master weights and loss math stay fp32
    reference_offload: bool = False  # keep the reference model in CPU memory; on the device only for its forward

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        for name in ("ppo_epochs", "mini_batches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.clip_ratio_low < 1 and self.clip_ratio_high >= 0):
            raise ValueError(
                f"need 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0; got {self.clip_ratio_low}, {self.clip_ratio_high}"
            )


@dataclass
class PolicyBatch:
    """What the learner trains on: a rollout plus the strategy's credit assignment."""

    rollout: Rollout
    unit_ids: Tensor  # [B, T] long, -1 = no credit
    advantages: Tensor  # [B, T] float32


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """LR factor at optimizer step `step` (0-based): linear warm-up, then constant / linear / cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


class Learner:
    """Owns the optimizer and LR schedule of a policy; `update` runs one RL update."""

    def __init__(self, model, config: LearnerConfig, strategy, reference_model=None):
        if config.kl_coef > 0 and reference_model is None:
            raise ValueError("kl_coef > 0 needs a reference model (a frozen copy of the initial policy)")
        self.model = model
        self.config = config
        self.strategy = strategy
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.eval().requires_grad_(False)
            if config.reference_offload:
                reference_model.to("cpu")
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(step, config.lr_schedule, config.warmup_steps, config.total_steps),
        )

    # ------------------------------------------------------------------
    def _autocast(self):
        device = next(self.model.parameters()).device
        if self.config.bf16_autocast and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _micro_batches(self, rows: Tensor) -> list[Tensor]:
        return list(rows.split(self.config.micro_batch_size))

    def _score(self, model, rollout: Rollout, rows: Tensor, with_entropy: bool = False):
        """Log-probs of the completion tokens of `rows`, trimming padding columns first."""
        prompt_mask = rollout.prompt_mask[rows]
        completion_mask = rollout.completion_mask[rows]
        first_prompt_column = int(prompt_mask.any(dim=0).nonzero()[0])  # left padding shared by all rows
        completion_length = max(int(completion_mask.any(dim=0).nonzero()[-1]) + 1, 1) if completion_mask.any() else 1
        with self._autocast():
            scores = completion_logprobs(
                model,
                rollout.prompt_ids[rows, first_prompt_column:],
                prompt_mask[:, first_prompt_column:],
                rollout.completion_ids[rows, :completion_length],
                completion_mask[:, :completion_length],
                temperature=rollout.temperature,
                chunk_size=self.config.logits_chunk_size,
                with_entropy=with_entropy,
            )
        return scores, completion_length

    def _logprobs_no_grad(self, model, rollout: Rollout) -> Tensor:
        """Log-probs of every row under `model`, [B, T] (micro-batched, no autograd graph)."""
        with torch.inference_mode():
            logprobs = torch.zeros_like(rollout.old_logprobs)
            for rows in self._micro_batches(torch.arange(rollout.num_rows, device=logprobs.device)):
                scores, length = self._score(model, rollout, rows)
                logprobs[rows, :length] = scores.logprobs
        return logprobs.clone()  # a normal tensor again: the loss uses it under autograd

    def _reference_logprobs(self, rollout: Rollout) -> Tensor:
        """Log-probs of every row under the frozen reference model, [B, T]."""
        if not self.config.reference_offload:
            return self._logprobs_no_grad(self.reference_model, rollout)
        self.reference_model.to(rollout.completion_ids.device)
        try:
            return self._logprobs_no_grad(self.reference_model, rollout)
        finally:
            self.reference_model.to("cpu")

    # ------------------------------------------------------------------
    def update(self, batch: PolicyBatch) -> dict[str, float]:
        config = self.config
        rollout = batch.rollout
        mask = rollout.completion_mask.bool()  # [B, T]
        device = mask.device
        ref_logprobs = self._reference_logprobs(rollout) if config.kl_coef > 0 else None
        on_policy = config.ppo_epochs == 1 and config.mini_batches == 1
        old_logprobs = None if on_policy else self._logprobs_no_grad(self.model, rollout)
        max_length = config.loss_max_length or rollout.completion_ids.shape[1]

        self.model.train()
        totals = {"loss": 0.0, "kl": 0.0, "clipped_tokens": 0.0, "entropy": 0.0, "tokens": 0.0,
                  "entropy_tokens": 0.0, "grad_norm": 0.0, "optimizer_steps": 0.0, "skipped_steps": 0.0,
                  "ratio_max": 0.0}
        all_rows = torch.arange(rollout.num_rows, device=device)
        for epoch in range(config.ppo_epochs):
            for mini_batch_rows in all_rows.tensor_split(config.mini_batches):
                if mini_batch_rows.numel() == 0:
                    continue
                num_tokens = float(mask[mini_batch_rows].sum())
                num_sequences = float(mini_batch_rows.numel())
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for rows in self._micro_batches(mini_batch_rows):
                    scores, length = self._score(self.model, rollout, rows, with_entropy=epoch == 0)
                    logprobs = scores.logprobs  # [b, t]
                    row_mask = mask[rows, :length]  # [b, t]
                    old = logprobs.detach() if on_policy else old_logprobs[rows, :length]
                    unit_ids = batch.unit_ids[rows, :length]
                    log_ratio = (logprobs - old) * row_mask  # zero on padding before any exp
                    pooled_log_ratio = self.strategy.pool_log_ratio(log_ratio, unit_ids)  # [b, t]
                    per_token_loss, clipped = clipped_surrogate(
                        pooled_log_ratio, batch.advantages[rows, :length],
                        config.clip_ratio_low, config.clip_ratio_high, config.clip_ratio_c,
                    )
                    if ref_logprobs is not None:
                        kl = kl_penalty(logprobs, ref_logprobs[rows, :length], config.kl_loss_type)  # [b, t]
                        per_token_loss = per_token_loss + config.kl_coef * kl
                        totals["kl"] += float((kl.detach() * row_mask).sum())
                    loss = aggregate(
                        per_token_loss, row_mask, config.loss_agg_mode,
                        num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length,
                        unit_ids=unit_ids, num_units=self.strategy.num_units,
                    )
                    loss = loss + self.strategy.extra_loss(batch, scores) * (rows.numel() / num_sequences)
                    loss.backward()
                    step_loss += float(loss.detach())
                    totals["clipped_tokens"] += float((clipped & row_mask).sum())
                    totals["tokens"] += float(row_mask.sum())
                    totals["ratio_max"] = max(totals["ratio_max"], float(pooled_log_ratio.detach().max().exp()))
                    if scores.entropy is not None:
                        totals["entropy"] += float((scores.entropy * row_mask).sum())
                        totals["entropy_tokens"] += float(row_mask.sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                if math.isfinite(step_loss) and bool(torch.isfinite(grad_norm)):
                    self.optimizer.step()
                    self.scheduler.step()
                    totals["optimizer_steps"] += 1
                    totals["grad_norm"] += float(grad_norm)
                else:
                    totals["skipped_steps"] += 1
                self.optimizer.zero_grad(set_to_none=True)
                totals["loss"] += step_loss
        passes = config.ppo_epochs * config.mini_batches
        return {
            "loss": totals["loss"] / passes,
            "kl": totals["kl"] / max(totals["tokens"], 1.0),
            "clip_frac": totals["clipped_tokens"] / max(totals["tokens"], 1.0),
            "entropy": totals["entropy"] / max(totals["entropy_tokens"], 1.0),
            "grad_norm": totals["grad_norm"] / max(totals["optimizer_steps"], 1.0),
            "ratio_max": totals["ratio_max"],
            "skipped_optimizer_steps": totals["skipped_steps"],
            "lr": self.scheduler.get_last_lr()[0],
        }
