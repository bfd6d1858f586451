"""Per-token log-probs of completions under a model (the "recompute").

For a completion token y_t that follows the context c_t (prompt + y_<t):

    log pi(y_t | c_t) = z[y_t] / tau - logsumexp(z / tau)        z = lm_head(h_t)

This is the *selective* log-softmax: gather the chosen logit, subtract the
log-normaliser. The full [B, T, V] fp32 log-softmax is never built: the hidden
states of the completion positions go through `lm_head` in chunks of
`chunk_size` positions, so the extra memory is O(B * chunk_size * V). When
gradients are needed each chunk is wrapped in activation checkpointing, so the
chunk's logits are not kept for the backward pass either (they are recomputed,
one extra `lm_head` matmul per chunk).

Inputs follow the sampler's layout: left-padded prompts, right-padded completions.
The attention mask is the concatenation of both masks and the position ids are
`cumsum(mask) - 1`, exactly as at sampling time, so recomputed log-probs equal the
sampler's `old_logprobs` (the consistency test holds them within 1e-5 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenScores:
    logprobs: Tensor  # [B, T] float32 (grad flows when enabled)
    entropy: Tensor | None  # [B, T] float32, detached; None unless asked for


def _selective_log_softmax(
    hidden: Tensor, lm_head: torch.nn.Module, targets: Tensor, temperature: float
) -> Tensor:
    """hidden [B, C, H], targets [B, C] -> log pi(target) [B, C] in fp32."""
    logits = lm_head(hidden).float() / temperature  # [B, C, V]
    chosen = logits.gather(-1, targets[..., None]).squeeze(-1)  # [B, C]
    return chosen - torch.logsumexp(logits, dim=-1)


def _entropy(hidden: Tensor, lm_head: torch.nn.Module, temperature: float) -> Tensor:
    """hidden [B, C, H] -> entropy of softmax(logits / temperature) [B, C]."""
    logits = lm_head(hidden).float() / temperature  # [B, C, V]
    logprobs = logits.log_softmax(dim=-1)
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def completion_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
) -> TokenScores:
    """Log-probs of each completion token, [B, T]; positions outside the mask are 0.

    prompt_ids/prompt_mask [B, S] (left-padded), completion_ids/completion_mask [B, T].
    `temperature` must be the sampling temperature (1.0 for greedy rollouts).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    prompt_length = prompt_ids.shape[1]
    completion_length = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, S + T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # [B, S + T]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, S + T]

    backbone = model.get_decoder()
    lm_head = model.get_output_embeddings()
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, S + T, H]
    # The hidden state at position i predicts token i + 1: completion token t is
    # predicted from position S - 1 + t.
    hidden = hidden[:, prompt_length - 1 : prompt_length - 1 + completion_length]  # [B, T, H]

    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, completion_length, chunk_size):
        hidden_chunk = hidden[:, start : start + chunk_size]  # [B, C, H]
        target_chunk = completion_ids[:, start : start + chunk_size]  # [B, C]
        if use_checkpoint:
            chunk = checkpoint(
                _selective_log_softmax, hidden_chunk, lm_head, target_chunk, temperature, use_reentrant=False
            )
        else:
            chunk = _selective_log_softmax(hidden_chunk, lm_head, target_chunk, temperature)
        logprob_chunks.append(chunk)
        if with_entropy:
            with torch.no_grad():
                entropy_chunks.append(_entropy(hidden_chunk.detach(), lm_head, temperature))
    mask = completion_mask.bool()
    logprobs = torch.cat(logprob_chunks, dim=1).masked_fill(~mask, 0.0)  # [B, T]
    entropy = torch.cat(entropy_chunks, dim=1).masked_fill(~mask, 0.0) if with_entropy else None
    return TokenScores(logprobs=logprobs, entropy=entropy)
