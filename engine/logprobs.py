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

The model is reached through its own `forward` (so DDP / FSDP2 wrappers, which hook
`forward`, see every call): it runs with `logits_to_keep=1` (one position of logits,
not S + T), and a forward hook on the decoder backbone keeps its output, the final
hidden states [B, S + T, H]. A strategy may ask for the hidden state *at* chosen
completion tokens (`hidden_positions`; RecPO's head reads the state after `<answer>`);
they come from this same forward.

A sampler's `logits_hook` (constrained decoding) is applied to the logits of every
chunk exactly as the sampler applied it to each step's logits, so the recomputed
log-probs are those of the same constrained distribution.

Inputs follow the sampler's layout: left-padded prompts, right-padded completions.
The attention mask is the concatenation of both masks and the position ids are
`cumsum(mask) - 1`, exactly as at sampling time, so recomputed log-probs equal the
sampler's `old_logprobs` (the consistency test holds them within 1e-5 in fp32).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# logits_hook(logits [N, C, V], prompt_indices [N], completion_ids [N, T], start) -> logits [N, C, V]:
# the logits of completion positions start .. start + C - 1 with disallowed tokens set to -inf.
LogitsHook = Callable[[Tensor, Tensor, Tensor, int], Tensor]


@dataclass
class TokenScores:
    logprobs: Tensor  # [B, T] float32 (grad flows when enabled)
    entropy: Tensor | None  # [B, T] float32, detached; None unless asked for
    hidden: Tensor | None  # [B, H] hidden state at `hidden_positions` (grad flows); None unless asked for


def unwrap_model(model):
    """The transformers model inside a DistributedDataParallel wrapper (FSDP2 keeps the object itself)."""
    return getattr(model, "module", model)


@contextmanager
def _backbone_output(model):
    """Collect the decoder backbone's final hidden states during a forward of `model`."""
    captured: list[Tensor] = []

    def keep(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = unwrap_model(model).get_decoder().register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def _chunk_logits(hidden: Tensor, lm_head, temperature: float, logits_hook: LogitsHook | None,
                  prompt_indices: Tensor | None, completion_ids: Tensor, start: int) -> Tensor:
    """hidden [B, C, H] -> float32 logits / temperature [B, C, V], constrained by the hook if any."""
    logits = lm_head(hidden).float()  # [B, C, V]
    if logits_hook is not None:
        logits = logits_hook(logits, prompt_indices, completion_ids, start)
    return logits / temperature


def _selective_log_softmax(hidden, lm_head, targets, temperature, logits_hook, prompt_indices, completion_ids,
                           start) -> Tensor:
    """hidden [B, C, H], targets [B, C] -> log pi(target) [B, C] in fp32."""
    logits = _chunk_logits(hidden, lm_head, temperature, logits_hook, prompt_indices, completion_ids, start)
    chosen = logits.gather(-1, targets[..., None]).squeeze(-1)  # [B, C]
    return chosen - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
    hidden_positions: Tensor | None = None,
    logits_hook: LogitsHook | None = None,
    prompt_indices: Tensor | None = None,
) -> TokenScores:
    """Log-probs of each completion token, [B, T]; positions outside the mask are 0.

    prompt_ids/prompt_mask [B, S] (left-padded), completion_ids/completion_mask [B, T].
    `temperature` must be the sampling temperature (1.0 for greedy rollouts).
    `hidden_positions` [B] long: completion columns whose own hidden state to return.
    `logits_hook` / `prompt_indices` [B]: the sampler's constraint and the rows' prompts.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    prompt_length = prompt_ids.shape[1]
    completion_length = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, S + T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # [B, S + T]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, S + T]

    with _backbone_output(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)
    all_hidden = captured[-1]  # [B, S + T, H]
    hidden_at = None
    if hidden_positions is not None:
        rows = torch.arange(all_hidden.shape[0], device=all_hidden.device)
        hidden_at = all_hidden[rows, prompt_length + hidden_positions]  # [B, H]
    # The hidden state at position i predicts token i + 1: completion token t is
    # predicted from position S - 1 + t.
    hidden = all_hidden[:, prompt_length - 1 : prompt_length - 1 + completion_length]  # [B, T, H]
    lm_head = unwrap_model(model).get_output_embeddings()

    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, completion_length, chunk_size):
        hidden_chunk = hidden[:, start : start + chunk_size]  # [B, C, H]
        arguments = (hidden_chunk, lm_head, completion_ids[:, start : start + chunk_size], temperature,
                     logits_hook, prompt_indices, completion_ids, start)
        if use_checkpoint:
            logprob_chunks.append(checkpoint(_selective_log_softmax, *arguments, use_reentrant=False))
        else:
            logprob_chunks.append(_selective_log_softmax(*arguments))
        if with_entropy:
            with torch.no_grad():
                logits = _chunk_logits(hidden_chunk.detach(), lm_head, temperature, logits_hook, prompt_indices,
                                       completion_ids, start)  # [B, C, V]
                logprobs = logits.log_softmax(dim=-1)
                entropy_chunks.append(-(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(dim=-1))
    mask = completion_mask.bool()
    logprobs = torch.cat(logprob_chunks, dim=1).masked_fill(~mask, 0.0)  # [B, T]
    entropy = torch.cat(entropy_chunks, dim=1).masked_fill(~mask, 0.0) if with_entropy else None
    return TokenScores(logprobs=logprobs, entropy=entropy, hidden=hidden_at)
