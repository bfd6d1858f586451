"""KV-cache sampler: prompts in, a `Rollout` of G completions per prompt out.

Algorithm (one call of `sample`):

1. Prompts arrive left-padded, `prompt_ids [P, S]` with `prompt_mask [P, S]`.
   Position ids come from the mask (`cumsum(mask) - 1`), so padding never shifts RoPE.
2. Each prompt is prefilled once; its KV cache is then expanded to G rows, so a
   batch holds `B = P * G` rows and the rows of one group are contiguous
   (`row = p * G + g`, `group_ids[row] = p`).
3. Decoding draws one token per row per step from `softmax(logits / temperature)`,
   optionally restricted to the top-k tokens and to the top-p nucleus, with a
   `torch.Generator` so runs are reproducible. Temperature 0 means greedy.
4. A row stops at its first EOS (the EOS is kept: it is an action the policy took);
   later positions are padding with `completion_mask = 0`. Finished rows are dropped
   from the decoder batch (once a quarter of it has finished on a CPU, three quarters
   on a GPU), so they stop costing compute. The batch stops when every row is done or
   after `max_new_tokens`.
5. `old_logprobs[b, t] = log softmax(logits / temperature)[token]` over the full
   vocabulary (not the top-k / top-p renormalised distribution), which is exactly
   what `engine.logprobs.completion_logprobs` recomputes. At temperature 0 the
   log-probs are taken at temperature 1.

Masks, not token ids, decide what counts: the pad id may equal the EOS id.

The forward pass used for decoding is `engine.decoder.KVDecoder` (fused weights,
preallocated cache, CUDA-graph decode step on GPUs) for the Llama/Qwen2 family, and
the transformers forward with a `DynamicCache` for any other architecture. The loop
below never waits for the device except every `check_every` steps, when it looks
for finished rows, and when the decoder captures a CUDA graph (at the first step of
each 64-token bucket of generated length, and after rows are dropped).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from engine.decoder import KVDecoder, sample_categorical


DECODE_DTYPES = {"auto": None, "model": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    top_k: int = 0  # 0 = no top-k filtering
    # precision of the decoder's weight snapshot and KV cache: "model" (the policy's
    # own dtype), a dtype name, or "auto": bfloat16 when the fast decoder samples an
    # fp32 model on CUDA (the learner recomputes the log-probs it trains on anyway),
    # else the model's own.
    dtype: str = "model"
    cuda_graphs: bool = True  # replay the decode step as a CUDA graph (fast decoder on CUDA only)

    def __post_init__(self) -> None:
        if self.dtype not in DECODE_DTYPES:
            raise ValueError(f"unknown rollout dtype {self.dtype!r}; choose one of {sorted(DECODE_DTYPES)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Rollout:
    """G sampled completions for each of P prompts; B = P * G rows, groups contiguous."""

    prompt_ids: Tensor  # [B, S] long, left-padded
    prompt_mask: Tensor  # [B, S] bool
    completion_ids: Tensor  # [B, T] long, EOS included, pad after
    completion_mask: Tensor  # [B, T] bool, 1 up to and including EOS
    old_logprobs: Tensor  # [B, T] float32, sampling policy at the sampling temperature
    group_ids: Tensor  # [B] long, prompt index of each row
    ended_with_eos: Tensor  # [B] bool, False for rows cut at max_new_tokens
    temperature: float  # the temperature the log-probs refer to (1.0 for greedy)

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_lengths(self) -> Tensor:  # [B] long
        return self.completion_mask.sum(dim=1)

    def select_rows(self, rows: Tensor) -> "Rollout":
        """The rollout restricted to `rows` (a [K] long index); group ids are kept as they are."""
        tensors = {
            field.name: getattr(self, field.name)[rows]
            for field in fields(self)
            if isinstance(getattr(self, field.name), Tensor)
        }
        return replace(self, **tensors)

    @staticmethod
    def concatenate(rollouts: list["Rollout"]) -> "Rollout":
        """Stack rollouts row-wise, re-padding prompts (left) and completions (right).

        Group ids of later rollouts are offset so groups stay distinct and contiguous.
        """
        if not rollouts:
            raise ValueError("cannot concatenate an empty list of rollouts")
        if len({r.temperature for r in rollouts}) != 1:
            raise ValueError("cannot concatenate rollouts sampled at different temperatures")
        prompt_length = max(r.prompt_ids.shape[1] for r in rollouts)
        completion_length = max(r.completion_ids.shape[1] for r in rollouts)

        def pad(tensor: Tensor, length: int, left: bool, value) -> Tensor:
            missing = length - tensor.shape[1]
            if missing == 0:
                return tensor
            filler = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
            return torch.cat([filler, tensor] if left else [tensor, filler], dim=1)

        group_offset = 0
        group_ids = []
        for rollout in rollouts:
            group_ids.append(rollout.group_ids - rollout.group_ids.min() + group_offset)
            group_offset = int(group_ids[-1].max()) + 1
        return Rollout(
            prompt_ids=torch.cat([pad(r.prompt_ids, prompt_length, True, 0) for r in rollouts]),
            prompt_mask=torch.cat([pad(r.prompt_mask, prompt_length, True, False) for r in rollouts]),
            completion_ids=torch.cat([pad(r.completion_ids, completion_length, False, 0) for r in rollouts]),
            completion_mask=torch.cat([pad(r.completion_mask, completion_length, False, False) for r in rollouts]),
            old_logprobs=torch.cat([pad(r.old_logprobs, completion_length, False, 0.0) for r in rollouts]),
            group_ids=torch.cat(group_ids),
            ended_with_eos=torch.cat([r.ended_with_eos for r in rollouts]),
            temperature=rollouts[0].temperature,
        )


class TransformersDecoder:
    """Fallback decoder for architectures `KVDecoder` does not support: the model's own
    forward with a `DynamicCache`. Same interface as `KVDecoder`."""

    def __init__(self, model, max_batch_size: int, max_total_length: int):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        # transformers >= 5.2x names the argument `cache`; earlier versions `past_key_values`.
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.attention_mask: Tensor | None = None  # [B, S + t]
        self.positions: Tensor | None = None  # [B] next position of each row

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, repeats: int) -> Tensor:
        mask = attention_mask.long()
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [P, S]
        outputs = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
            use_cache=True, **{self.cache_argument: self.cache},
        )
        self.cache.batch_repeat_interleave(repeats)
        self.attention_mask = mask.repeat_interleave(repeats, dim=0)  # [B, S]
        self.positions = mask.sum(dim=1).repeat_interleave(repeats)  # [B]
        return outputs.logits[:, -1].float().repeat_interleave(repeats, dim=0)  # [B, V]

    @torch.inference_mode()
    def decode(self, token_ids: Tensor) -> Tensor:
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        outputs = self.model(
            input_ids=token_ids[:, None], attention_mask=self.attention_mask,
            position_ids=self.positions[:, None], use_cache=True, **{self.cache_argument: self.cache},
        )
        self.positions = self.positions + 1
        return outputs.logits[:, -1].float()  # [B, V]

    def keep_rows(self, row_indices: Tensor) -> None:
        """Keep only these rows (in this order) for the following decode steps."""
        self.cache.batch_select_indices(row_indices)
        self.attention_mask = self.attention_mask[row_indices]
        self.positions = self.positions[row_indices]


def make_decoder(model, max_batch_size: int, max_total_length: int, dtype: str = "model", cuda_graphs: bool = True):
    """The fastest decoder that supports `model`, sampling in precision `dtype` (see `SamplingConfig.dtype`)."""
    parameter = next(model.parameters())
    if KVDecoder.supports(model):
        decode_dtype = DECODE_DTYPES[dtype]
        if dtype == "auto" and parameter.device.type == "cuda" and parameter.dtype == torch.float32:
            decode_dtype = torch.bfloat16
        return KVDecoder(model, max_batch_size=max_batch_size, max_total_length=max_total_length, dtype=decode_dtype,
                         cuda_graphs=None if cuda_graphs else False)
    if DECODE_DTYPES[dtype] not in (None, parameter.dtype):
        raise ValueError(
            f"rollout dtype {dtype} differs from the model's {parameter.dtype}, and only the fast decoder "
            f"(Llama / Qwen2 family) can sample in another precision; {type(model).__name__} samples with the "
            f"transformers forward: set the rollout dtype (--set rollout_dtype=...) to 'auto' or 'model'"
        )
    return TransformersDecoder(model, max_batch_size=max_batch_size, max_total_length=max_total_length)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k tokens and outside the top-p nucleus to -inf.

    logits: [B, V] (already divided by the temperature). The nucleus is the smallest
    set of most likely tokens whose probability reaches `top_p`; the most likely token
    is always kept.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        sorted_probs = sorted_logits.softmax(dim=-1)
        probability_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        drop_sorted = probability_before >= top_p  # [B, V]; the first token is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()  # not inference_mode: the learner later uses these tensors under autograd
def sample(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    group_size: int,
    config: SamplingConfig,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample `group_size` completions for each left-padded prompt.

    prompt_ids, prompt_mask: [P, S]. Returns a `Rollout` with B = P * group_size rows.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [P, S]; got {tuple(prompt_ids.shape)} "
            f"and {tuple(prompt_mask.shape)}"
        )
    if prompt_ids.shape[0] == 0:
        raise ValueError("no prompts to sample from")
    prompt_mask = prompt_mask.bool()
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all ones")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    device = prompt_ids.device
    num_prompts, prompt_length = prompt_ids.shape
    batch_size = num_prompts * group_size
    max_new_tokens = config.max_new_tokens
    greedy = config.temperature == 0
    temperature = 1.0 if greedy else config.temperature
    eos_ids = torch.tensor(eos_token_ids, device=device)  # [E]

    was_training = model.training
    model.eval()
    decoder = make_decoder(model, batch_size, prompt_length + max_new_tokens, config.dtype, config.cuda_graphs)
    logits = decoder.prefill(prompt_ids, prompt_mask, group_size)  # [B, V]

    completion_ids = torch.full((batch_size, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((batch_size, max_new_tokens), dtype=torch.bool, device=device)
    old_logprobs = torch.zeros((batch_size, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
    # The decoder holds only the rows still generating: `decoder_rows[a]` is the batch
    # row of decoder row a. Finished rows are dropped (`keep_rows`) so they stop costing
    # compute: on a CPU, where a step costs in proportion to its rows, once a quarter of
    # them are done; on a GPU, where a step costs about the same whatever the rows (it
    # reads every weight once) and a new row count means capturing new CUDA graphs, once
    # three quarters are done. Checking for finished rows needs a device->host sync; on
    # GPUs it happens every few steps.
    decoder_rows = torch.arange(batch_size, device=device)  # [A]
    check_every, compact_below = (1, 0.75) if device.type == "cpu" else (8, 0.25)

    steps_taken = 0
    for step in range(max_new_tokens):
        scaled = logits / temperature  # [A, V] float32
        logprobs_all = scaled.log_softmax(dim=-1)  # [A, V]
        if greedy:
            tokens = scaled.argmax(dim=-1)  # [A]
        else:
            if config.top_k > 0 or config.top_p < 1.0:
                probs = filter_logits(scaled, config.top_k, config.top_p).softmax(dim=-1)
            else:
                probs = logprobs_all.exp()  # [A, V]; the full softmax, already computed
            tokens = sample_categorical(probs, generator=generator)  # [A]; exact, cheaper than multinomial
        alive = ~done[decoder_rows]  # [A] rows that had not finished before this step
        tokens = torch.where(alive, tokens, torch.full_like(tokens, pad_token_id))
        completion_ids[decoder_rows, step] = tokens
        completion_mask[decoder_rows, step] = alive
        old_logprobs[decoder_rows, step] = logprobs_all.gather(1, tokens[:, None]).squeeze(1) * alive
        done[decoder_rows] = done[decoder_rows] | (alive & torch.isin(tokens, eos_ids))
        steps_taken = step + 1
        if step == max_new_tokens - 1:
            break
        if (step + 1) % check_every == 0:
            still_running = (~done[decoder_rows]).nonzero().squeeze(1)  # [A'] decoder rows
            if still_running.numel() == 0:
                break
            if still_running.numel() <= compact_below * decoder_rows.numel():
                decoder.keep_rows(still_running)
                decoder_rows, tokens = decoder_rows[still_running], tokens[still_running]
        logits = decoder.decode(tokens)  # [A, V]

    model.train(was_training)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids[:, :steps_taken],
        completion_mask=completion_mask[:, :steps_taken],
        old_logprobs=old_logprobs[:, :steps_taken],
        group_ids=torch.arange(num_prompts, device=device).repeat_interleave(group_size),
        ended_with_eos=done,
        temperature=temperature,
    )
