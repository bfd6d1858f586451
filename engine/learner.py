"""One policy update over a rollout batch: the data movement around `engine.loss.policy_loss`.

    for epoch in 1..ppo_epochs (mu):
        for each of `mini_batches` slices of the rows:            -> one optimizer step
            for each micro-batch of `micro_batch_size` rows:       -> gradient accumulation
                logprobs   = recompute(policy)                      [b, T]  (+ hidden states a strategy asks for)
                loss       = policy_loss(logprobs, old, A, mask, unit ids, ref, normalisers of the whole slice)
                           + strategy.extra_loss(...) / rows of the slice
                loss.backward()
            clip grad norm, AdamW step, LR schedule step (skipped if the loss or gradient is not finite)

On-policy (one epoch, one mini-batch) the old log-probs are `logprobs.detach()`; otherwise they are recomputed
once before the first update. Details: docs/engine.md, section engine/learner.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.config import check, check_choice, is_finite_number
from engine.distributed import all_reduce, average_gradients, is_sharded, step_counts
from engine.logprobs import TokenScores, completion_logprobs
from engine.loss import LossConfig, policy_loss
from engine.rollout import Rollout

LR_SCHEDULES = ("constant", "linear", "cosine")
MAX_LR = 1.0  # AdamW moves each weight by about lr per step: above 1 any model diverges at once


class TrainingFailed(RuntimeError):
    """Training produced no usable model (a non-finite SFT loss, a policy whose logits are NaN, or no RL step that
    changed the weights); the message says what happened and what to change."""


@dataclass
class LearnerConfig(LossConfig):
    """Optimisation settings; the loss settings (clip range, aggregation, KL) come from `LossConfig`."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    ppo_epochs: int = 1  # mu: passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    micro_batch_size: int = 8  # rows per forward/backward (gradient accumulation)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    logits_chunk_size: int = 128
    bf16_autocast: bool = True  # on CUDA only; master weights and loss math stay fp32
    reference_offload: bool = False  # keep the reference model in CPU memory; on the device only for its forward

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite_number(self.lr) and 0 < self.lr <= MAX_LR, "lr", self.lr, f"must be in (0, {MAX_LR:g}]")
        check(is_finite_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
              "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)")
        check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "must be > 0")
        for name in ("ppo_epochs", "mini_batches", "micro_batch_size", "logits_chunk_size"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class Rewards:
    """What the task said about each completion: values [B, U] over a variable number of units per row (mask:
    which exist), and `extras`, further per-row tensors a strategy reads (B rows each). Details: docs/engine.md."""

    values: Tensor  # [B, U] float32
    mask: Tensor  # [B, U] bool
    extras: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def from_tensor(values: Tensor) -> "Rewards":
        """Rewards from a [B] (one per completion) or [B, N] (one per unit, all present) tensor."""
        values = values.float()
        if values.dim() == 1:
            values = values[:, None]
        if values.dim() != 2:
            raise ValueError(f"rewards must be [B] or [B, U]; got shape {tuple(values.shape)}")
        return Rewards(values, torch.ones_like(values, dtype=torch.bool))

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    def select_rows(self, rows: Tensor) -> "Rewards":
        return Rewards(self.values[rows], self.mask[rows], {k: v[rows] for k, v in self.extras.items()})

    @staticmethod
    def concatenate(parts: list["Rewards"]) -> "Rewards":
        """Stack rows; the unit axis is padded to the widest part (padding units are masked out)."""
        width = max(part.values.shape[1] for part in parts)

        def widen(tensor: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

        keys = set(parts[0].extras)
        if any(set(part.extras) != keys for part in parts):
            raise ValueError("cannot concatenate rewards with different extras")
        return Rewards(
            torch.cat([widen(part.values, 0.0) for part in parts]),
            torch.cat([widen(part.mask, False) for part in parts]),
            {key: torch.cat([part.extras[key] for part in parts]) for key in keys},
        )


@dataclass
class PolicyBatch:
    """What the learner trains on: a rollout, its rewards and the strategy's credit assignment."""

    rollout: Rollout
    rewards: Rewards
    unit_ids: Tensor  # [B, T] long, -1 = no credit
    advantages: Tensor  # [B, T] float32, constant inside a unit
    num_units: int | None = None  # the divisor N of loss_agg_mode seq_mean_unit_mean


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
    """Owns the optimizer and LR schedule of a policy (and of the strategy's own parameters); `update` runs one."""

    def __init__(self, model, config: LearnerConfig, strategy, reference_model=None, total_optimizer_steps: int = 1):
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
        self.strategy_parameters = list(strategy.parameters())
        if self.strategy_parameters and is_sharded(model):
            raise ValueError("a strategy with its own parameters (a head) trains under trainer.distributed=ddp or in "
                             "one process, not under fsdp2; use --set trainer.distributed=ddp")
        self.parameters = [p for p in model.parameters() if p.requires_grad] + self.strategy_parameters
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(
            step, config.lr_schedule, config.warmup_steps, total_optimizer_steps))

    # ------------------------------------------------------------------
    def _autocast(self):
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, torch.bfloat16, enabled=self.config.bf16_autocast and device.type == "cuda")

    def _score(self, model, rollout: Rollout, rows: Tensor, with_entropy: bool = False,
               hidden_positions: Tensor | None = None) -> tuple[TokenScores, int]:
        """Log-probs of the completion tokens of `rows`, trimming padding columns first."""
        prompt_mask = rollout.prompt_mask[rows]
        completion_mask = rollout.completion_mask[rows]
        first_prompt_column = int(prompt_mask.any(dim=0).nonzero()[0])  # left padding shared by all rows
        completion_length = max(int(completion_mask.any(dim=0).nonzero()[-1]) + 1, 1) if completion_mask.any() else 1
        with self._autocast():
            scores = completion_logprobs(
                model, rollout.prompt_ids[rows, first_prompt_column:], prompt_mask[:, first_prompt_column:],
                rollout.completion_ids[rows, :completion_length], completion_mask[:, :completion_length],
                temperature=rollout.temperature, chunk_size=self.config.logits_chunk_size, with_entropy=with_entropy,
                hidden_positions=None if hidden_positions is None else hidden_positions[rows],
                logits_hook=rollout.logits_hook, prompt_indices=rollout.prompt_indices[rows])
        return scores, completion_length

    def _logprobs_no_grad(self, model, rollout: Rollout) -> Tensor:
        """Log-probs of every row under `model`, [B, T] (micro-batched, no autograd graph)."""
        with torch.no_grad() if is_sharded(model) else torch.inference_mode():  # FSDP2 writes into its buffers
            logprobs = torch.zeros_like(rollout.old_logprobs)
            for rows in torch.arange(rollout.num_rows, device=logprobs.device).split(self.config.micro_batch_size):
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
        config, strategy = self.config, self.strategy
        rollout = batch.rollout
        mask = rollout.completion_mask.bool()  # [B, T]
        device = mask.device
        ref_logprobs = self._reference_logprobs(rollout) if config.kl_coef > 0 else None
        on_policy = config.ppo_epochs == 1 and config.mini_batches == 1
        old_logprobs = None if on_policy else self._logprobs_no_grad(self.model, rollout)
        hidden_positions = strategy.hidden_positions(batch)  # [B] long or None
        strategy.begin_update(self.model, batch)

        self.model.train()
        sums = {key: torch.zeros((), device=device) for key in ("tokens", "clipped_tokens", "kl_sum", "ratio_sum",
                                                                "entropy", "entropy_tokens", "extra_loss")}
        ratio_max, ratio_min = torch.ones((), device=device), torch.ones((), device=device)
        losses, grad_norms, skipped = [], [], 0
        all_rows = torch.arange(rollout.num_rows, device=device)
        for epoch in range(config.ppo_epochs):
            for mini_batch_rows in all_rows.tensor_split(config.mini_batches):
                if mini_batch_rows.numel() == 0:
                    continue
                # of the whole step: over every rank, divided by their number (engine/distributed.py)
                num_tokens, num_sequences = step_counts(mask[mini_batch_rows])
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                for rows in mini_batch_rows.split(config.micro_batch_size):
                    scores, length = self._score(self.model, rollout, rows, with_entropy=epoch == 0,
                                                 hidden_positions=hidden_positions)
                    logprobs = scores.logprobs  # [b, t]
                    row_mask = mask[rows, :length]  # [b, t]
                    loss, metrics = policy_loss(
                        logprobs, logprobs.detach() if on_policy else old_logprobs[rows, :length],
                        batch.advantages[rows, :length], row_mask, config, unit_ids=batch.unit_ids[rows, :length],
                        ratio_level=strategy.ratio_level, num_units=batch.num_units,
                        ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows, :length],
                        num_tokens=num_tokens, num_sequences=num_sequences)
                    extra = strategy.extra_loss(self.model, batch, rows, scores.hidden)  # sum over rows, or None
                    if extra is not None:
                        loss = loss + extra / num_sequences
                        sums["extra_loss"] += extra.detach() / num_sequences
                    loss.backward()
                    step_loss += loss.detach()
                    for key in ("tokens", "clipped_tokens", "kl_sum", "ratio_sum"):
                        sums[key] += metrics[key]
                    ratio_max = torch.maximum(ratio_max, metrics["ratio_max"])
                    ratio_min = torch.minimum(ratio_min, metrics["ratio_min"])
                    if scores.entropy is not None:
                        sums["entropy"] += (scores.entropy * row_mask).sum()
                        sums["entropy_tokens"] += row_mask.sum()
                average_gradients(self.strategy_parameters)  # the model's: averaged by DDP / FSDP2
                grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
                step_loss = all_reduce(step_loss, "mean")  # the whole step's loss; every rank skips alike
                if bool(torch.isfinite(step_loss)) and bool(torch.isfinite(grad_norm)):
                    self.optimizer.step()
                    self.scheduler.step()
                    grad_norms.append(float(grad_norm))
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(float(step_loss))
        tokens = max(float(sums["tokens"]), 1.0)
        passes = config.ppo_epochs * config.mini_batches
        metrics = {
            "loss": sum(losses) / passes,
            "kl": float(sums["kl_sum"]) / tokens,
            "clip_frac": float(sums["clipped_tokens"]) / tokens,
            "entropy": float(sums["entropy"]) / max(float(sums["entropy_tokens"]), 1.0),
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "ratio_mean": float(sums["ratio_sum"]) / tokens,
            "ratio_max": float(ratio_max),
            "ratio_min": float(ratio_min),
            "skipped_optimizer_steps": skipped,
            "optimizer_steps": len(grad_norms),  # applied (not skipped)
            "lr": self.scheduler.get_last_lr()[0],
        }
        if strategy.extra_loss_name:
            metrics[strategy.extra_loss_name] = float(sums["extra_loss"]) / passes
        return metrics
