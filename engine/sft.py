"""Supervised warm start (behaviour cloning) on prompt -> demonstration pairs (demonstration tokens and EOS):

    L = - (1 / sum_i |y_i|) sum_i sum_t log pi_theta(y_{i,t} | x_i, y_{i,<t})

Same model code, prompt formatting and log-prob function as RL. Details: docs/engine.md, section engine/sft.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.config import check, is_finite_number
from engine.learner import MAX_LR, TrainingFailed, lr_multiplier
from engine.logprobs import completion_logprobs
from engine.tokens import encode_completions, encode_prompts


@dataclass
class SFTConfig:
    steps: int = 300  # 0 = no warm start
    lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", self.steps, "must be >= 0 (0 = no SFT)")
        check(is_finite_number(self.lr) and 0 < self.lr <= MAX_LR, "lr", self.lr, f"must be in (0, {MAX_LR:g}]")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "must be > 0")


def supervised_finetune(model, tokenizer, chats: list[list[dict]], completions: list[str], config: SFTConfig,
                        seed: int = 0, max_prompt_length: int = 512, max_completion_length: int = 256,
                        on_step=None) -> list[dict]:
    """Train `model` in place on (chat, completion) pairs; returns one metrics dict per step, each also passed
    to `on_step(metrics)` (for logging)."""
    if len(chats) != len(completions):
        raise ValueError(f"{len(chats)} prompts but {len(completions)} demonstrations")
    if not chats:
        raise ValueError("no SFT examples: the dataset has no demonstrations")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, "cosine", config.warmup_steps, config.steps))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(chats))
    position = 0
    history = []
    model.train()
    for step in range(config.steps):
        if position + config.batch_size > len(order):
            order, position = rng.permutation(len(chats)), 0
        batch = order[position : position + config.batch_size]
        position += config.batch_size
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [chats[i] for i in batch], max_prompt_length, device)
        completion_ids, completion_mask = encode_completions(tokenizer, [completions[i] for i in batch],
                                                             max_completion_length, device)
        logprobs = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logprobs
        loss = -(logprobs * completion_mask).sum() / completion_mask.sum()
        if not bool(torch.isfinite(loss)):  # weights that give NaN logits never recover: stop, cache nothing
            cause = (f"the warm start diverged; lower sft.lr (now {config.lr:g}) or sft.max_grad_norm" if step else
                     "before any update, so the model it starts from gives NaN or inf logits (check --model)")
            raise TrainingFailed(f"SFT step {step + 1}: the loss is {float(loss.detach())}: {cause}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        metrics = {"step": step + 1, "sft_loss": float(loss.detach()), "grad_norm": float(grad_norm),
                   "lr": scheduler.get_last_lr()[0]}
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
    if not all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters()):
        raise TrainingFailed(f"SFT: the weights hold NaN or inf after {config.steps} steps: the warm start diverged; "
                             f"lower sft.lr (now {config.lr:g})")
    model.eval()
    return history
