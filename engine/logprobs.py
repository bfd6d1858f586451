"""Per-token log-probs of completions under a model (the "recompute").

    log pi(y_t | c_t) = z[y_t] / tau - logsumexp(z / tau)        z = lm_head(h_t)
    d log pi(y_t) / dz = (onehot(y_t) - p) / tau        dh = dz W        dW = dz^T h,    p = softmax(z / tau)

A selective log-softmax over chunks of `chunk_size` positions (never the full [B, T, V]), with the sampler's
`logits_hook` and layout (position ids `cumsum(mask) - 1`), so it equals the sampler's `old_logprobs`.
Details: docs/engine.md, section engine/logprobs.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

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


class _ChunkLogProbs(torch.autograd.Function):
    """log pi(targets) [B, C] from hidden [B, C, H] via the LM head (weight [V, H], bias), the hook (it and
    its arguments after the logits, or None) and the temperature; the entropy [B, C] when asked; `keep`:
    keep p for the backward, which runs in the forward product's precision (bf16 under autocast)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, hook, temperature, with_entropy, keep):
        raw = F.linear(hidden, weight, bias)  # [B, C, V]; autocast decides its precision
        logits = _scaled_logits(raw.float(), hook, temperature)  # [B, C, V] float32
        chosen = logits.gather(-1, targets[..., None]).squeeze(-1)  # [B, C]
        maxes = logits.amax(dim=-1, keepdim=True)  # [B, C, 1]
        # e = exp(z / tau - m) [B, C, V]: beside the logits when the entropy needs them again, else over them
        exponentials = (logits - maxes).exp_() if with_entropy else logits.sub_(maxes).exp_()
        sums = exponentials.sum(dim=-1)  # [B, C]
        log_normaliser = sums.log() + maxes.squeeze(-1)  # [B, C] logsumexp(z / tau)
        probabilities = exponentials.div_(sums[..., None]) if keep or with_entropy else None  # p = e / s, in place
        entropy = None
        if with_entropy:  # -sum p log p = lse - sum p z / tau, counting 0 * -inf as 0
            values = logits.clamp_(min=torch.finfo(logits.dtype).min) if hook is not None else logits
            dot = torch.bmm(probabilities.view(-1, 1, values.shape[-1]), values.view(-1, values.shape[-1], 1))
            entropy = log_normaliser - dot.view_as(sums)
        ctx.probabilities = probabilities if keep else None
        ctx.save_for_backward(hidden, weight, bias, targets, log_normaliser)
        ctx.hook, ctx.temperature, ctx.compute_dtype = hook, temperature, raw.dtype
        ctx.mark_non_differentiable(*(() if entropy is None else (entropy,)))
        return chosen - log_normaliser, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, log_normaliser = ctx.saved_tensors
        dtype, needs = ctx.compute_dtype, ctx.needs_input_grad
        probabilities, ctx.probabilities = ctx.probabilities, None  # [B, C, V]; once (no double backward)
        if probabilities is None:  # recompute p = exp(z / tau - lse) (a kept p is e / s: equal up to rounding)
            raw = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
            probabilities = _scaled_logits(raw, ctx.hook, ctx.temperature).sub_(log_normaliser[..., None]).exp_()
        grad_logits = probabilities.mul_(-grad_logprobs[..., None])  # dz = (onehot(y) - p) g / tau, in place
        grad_logits.scatter_add_(-1, targets[..., None], grad_logprobs[..., None])
        grad_logits = (grad_logits.div_(ctx.temperature) if ctx.temperature != 1.0 else grad_logits).to(dtype)
        grad_logits = grad_logits.flatten(0, 1)  # [B * C, V]
        grad_hidden = grad_logits.mm(weight.to(dtype)).view_as(hidden).to(hidden.dtype) if needs[0] else None
        grad_weight = grad_logits.t().mm(hidden.to(dtype).flatten(0, 1)).to(weight.dtype) if needs[1] else None
        grad_bias = grad_logits.sum(0).to(bias.dtype) if needs[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _scaled_logits(logits: Tensor, hook, temperature: float) -> Tensor:
    """float32 logits [B, C, V] -> constrained by the hook (disallowed tokens -inf), / temperature."""
    logits = logits if hook is None else hook[0](logits, *hook[1:])
    return logits.div_(temperature) if temperature != 1.0 else logits


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, temperature: float = 1.0, chunk_size: int = 128,
                        with_entropy: bool = False, hidden_positions: Tensor | None = None,
                        logits_hook: LogitsHook | None = None, prompt_indices: Tensor | None = None) -> TokenScores:
    """Log-probs of each completion token, [B, T]; positions outside the mask are 0.

    prompt_ids/prompt_mask [B, S] (left-padded), completion_ids/completion_mask [B, T]. `temperature`: the sampling
    one (1.0 for greedy rollouts). `hidden_positions` [B] long: completion columns whose own hidden state to
    return. `logits_hook` / `prompt_indices` [B]: the sampler's constraint and the rows' prompts.
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
    # The hidden state at position i predicts token i + 1: completion token t, from position S - 1 + t.
    hidden = all_hidden[:, prompt_length - 1 : prompt_length - 1 + completion_length]  # [B, T, H]

    lm_head = unwrap_model(model).get_output_embeddings()
    keep = torch.is_grad_enabled() and completion_length <= chunk_size  # one chunk: keep p for the backward
    chunks = [_ChunkLogProbs.apply(  # (log-probs [B, C], entropy [B, C] or None) per chunk of C positions
        hidden[:, start:start + chunk_size], lm_head.weight, lm_head.bias, completion_ids[:, start:start + chunk_size],
        None if logits_hook is None else (logits_hook, prompt_indices, completion_ids, start), temperature,
        with_entropy, keep) for start in range(0, completion_length, chunk_size)]
    mask = completion_mask.bool()
    logprobs = torch.cat([chunk[0] for chunk in chunks], dim=1).masked_fill(~mask, 0.0)  # [B, T]
    entropy = torch.cat([chunk[1] for chunk in chunks], dim=1).masked_fill(~mask, 0.0) if with_entropy else None
    return TokenScores(logprobs=logprobs, entropy=entropy, hidden=hidden_at)
