"""KV-cache sampler: prompts in, a `Rollout` of G completions per prompt out.

Left-padded prompts [P, S] are prefilled once and expanded to B = P * G rows, groups contiguous
(`row = p * G + g`). Each step draws one token per row from softmax(hook(logits) / temperature), optionally
top-k / top-p filtered (or the argmax: `greedy`); a row stops at its first EOS, which is kept. Recorded:

    old_logprobs[b, t] = log softmax(hook(logits) / temperature)[token]     (full vocabulary; greedy: tau = 1)

exactly what `engine.logprobs.completion_logprobs` recomputes. Masks, not token ids, decide what counts.
Details (the decoders, dropping finished rows, drawing a token): docs/engine.md, section engine/rollout.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor

from engine.config import check, check_choice
from engine.logprobs import LogitsHook, unwrap_model

# make_decoder(model, max_batch_size, max_total_length, sampling config) -> an object with
# prefill(ids [P, S], mask [P, S], repeats) -> [P * repeats, V], decode(tokens [A]) -> [A, V], keep_rows(rows).
DecoderFactory = Callable[..., object]
DECODE_DTYPES = {"auto": None, "model": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # > 0; greedy decoding is `sample(..., greedy=True)`
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    top_k: int = 0  # 0 = no top-k filtering
    # decoder weights and KV cache: "model" (its own dtype), a dtype name (fast decoder only), or "auto":
    # bfloat16 when the fast decoder samples an fp32 model on CUDA, else the model's own (docs/engine.md)
    dtype: str = "auto"
    cuda_graphs: bool = True  # the fast decoder on CUDA replays its decode step as a CUDA graph
    # ... with its element-wise chains fused by torch.compile (inductor, needs Triton); off: 1.02x at Q05 on an
    # H200 for ~20 s of compilation per process (README, Performance)
    compile_decode: bool = False

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        check(self.temperature > 0, "temperature", self.temperature,
              "must be > 0 (at 0 every sample of a group is the same and no group has any reward spread)")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = off)")
        check_choice("dtype", self.dtype, list(DECODE_DTYPES))


@dataclass
class Rollout:
    """G sampled completions for each of P prompts; B = P * G rows, groups contiguous."""

    prompt_ids: Tensor  # [B, S] long, left-padded
    prompt_mask: Tensor  # [B, S] bool
    completion_ids: Tensor  # [B, T] long, EOS included, pad after
    completion_mask: Tensor  # [B, T] bool, 1 up to and including EOS
    old_logprobs: Tensor  # [B, T] float32, sampling policy at the sampling temperature
    group_ids: Tensor  # [B] long, prompt index of each row within this rollout
    prompt_indices: Tensor  # [B] long, the task's index of each row's prompt (-1 = not given)
    ended_with_eos: Tensor  # [B] bool, False for rows cut at max_new_tokens
    temperature: float  # the temperature the log-probs refer to (1.0 for greedy)
    logits_hook: LogitsHook | None = None  # the constraint the tokens were sampled under

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_lengths(self) -> Tensor:  # [B] long
        return self.completion_mask.sum(dim=1)

    def select_rows(self, rows: Tensor) -> "Rollout":
        """The rollout restricted to `rows` (a [K] long index); group ids are kept as they are."""
        tensors = {f.name: getattr(self, f.name)[rows] for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **tensors)

    @staticmethod
    def concatenate(rollouts: list["Rollout"]) -> "Rollout":
        """Stack rollouts row-wise, re-padding prompts (left) and completions (right); group ids of later
        rollouts are offset so groups stay distinct and contiguous."""
        if not rollouts:
            raise ValueError("cannot concatenate an empty list of rollouts")
        if len({(r.temperature, r.logits_hook) for r in rollouts}) != 1:
            raise ValueError("cannot concatenate rollouts sampled from different distributions (temperature, hook)")
        prompt_length = max(r.prompt_ids.shape[1] for r in rollouts)
        completion_length = max(r.completion_ids.shape[1] for r in rollouts)

        def pad(tensor: Tensor, length: int, left: bool, value) -> Tensor:
            missing = length - tensor.shape[1]
            return torch.nn.functional.pad(tensor, (missing, 0) if left else (0, missing), value=value)

        group_offset, group_ids = 0, []
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
            prompt_indices=torch.cat([r.prompt_indices for r in rollouts]),
            ended_with_eos=torch.cat([r.ended_with_eos for r in rollouts]),
            temperature=rollouts[0].temperature,
            logits_hook=rollouts[0].logits_hook,
        )


class TransformersDecoder:
    """The plain decoder: the model's own forward with a transformers `DynamicCache`. prefill(ids [P, S], mask
    [P, S], repeats) -> last logits [P * repeats, V]; decode(tokens [A]) -> next logits [A, V]; keep_rows(rows [A'])."""

    def __init__(self, model, max_batch_size: int, max_total_length: int):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        # transformers >= 5.2x names the argument `cache`; earlier versions `past_key_values`.
        parameters = inspect.signature(unwrap_model(model).forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.attention_mask: Tensor | None = None  # [B, S + t]
        self.positions: Tensor | None = None  # [B] next position of each row

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, repeats: int) -> Tensor:
        mask = attention_mask.long()
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [P, S]
        outputs = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             logits_to_keep=1, **{self.cache_argument: self.cache})
        self.cache.batch_repeat_interleave(repeats)
        self.attention_mask = mask.repeat_interleave(repeats, dim=0)  # [B, S]
        self.positions = mask.sum(dim=1).repeat_interleave(repeats)  # [B]
        return outputs.logits[:, -1].float().repeat_interleave(repeats, dim=0)  # [B, V]

    @torch.inference_mode()
    def decode(self, token_ids: Tensor) -> Tensor:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=1)
        outputs = self.model(input_ids=token_ids[:, None], attention_mask=self.attention_mask,
                             position_ids=self.positions[:, None], use_cache=True, **{self.cache_argument: self.cache})
        self.positions = self.positions + 1
        return outputs.logits[:, -1].float()  # [B, V]

    def keep_rows(self, row_indices: Tensor) -> None:
        """Keep only these rows (in this order) for the following decode steps."""
        self.cache.batch_select_indices(row_indices)
        self.attention_mask = self.attention_mask[row_indices]
        self.positions = self.positions[row_indices]


def transformers_decoder(model, max_batch_size: int, max_total_length: int, config: SamplingConfig):
    """The default decoder factory of `sample` (an accelerator such as `fastdecode.fast_decoder`
    has the same signature)."""
    parameter = next(model.parameters())
    if type(parameter).__name__ == "DTensor":
        raise ValueError(f"cannot sample from {type(model).__name__}: its weights are sharded (FSDP2); "
                         "gather them into a full copy first")
    if DECODE_DTYPES[config.dtype] not in (None, parameter.dtype):
        raise ValueError(
            f"rollout dtype {config.dtype} differs from the model's {parameter.dtype}, and only the fast decoder "
            f"(fastdecode, Llama / Qwen2 family) samples in another precision: set sampling.dtype to 'auto' or 'model'"
        )
    return TransformersDecoder(model, max_batch_size, max_total_length)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits [B, V] (already / temperature) outside the top-k tokens and outside the top-p nucleus (the
    smallest set of most likely tokens whose probability reaches `top_p`) to -inf; the most likely is always kept."""
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


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``probs`` [B, V] (>= 0, need not sum to 1), drawn as ``torch.multinomial(probs, 1)``
    would, by the exact method cheapest on the device (docs/engine.md). Zero-probability entries are never drawn."""
    if probs.device.type == "cuda":
        return sample_exponential_race(probs, generator)
    return sample_inverse_cdf(probs, generator)


def sample_inverse_cdf(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Inverse CDF: float64 cumsum + one uniform per row + searchsorted (on CPU ~20x cheaper than multinomial).
    ``right=True`` picks the first index whose cdf exceeds u * total: zero-probability entries are never drawn."""
    cdf = probs.to(torch.float64).cumsum_(-1)                                             # [B, V]
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    idx = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).squeeze(1)             # [B]
    return idx.clamp_(max=probs.shape[-1] - 1)


def sample_exponential_race(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Exponential race: argmax p_i / E_i with E_i ~ Exp(1) is an exact draw (no scan; on a GPU ~10x cheaper
    than the inverse CDF). fp32; E clamped away from 0, so p = 0 gives 0, never NaN. Why: docs/engine.md."""
    probs = probs.float()
    race = torch.empty_like(probs).exponential_(generator=generator)                      # [B, V]
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return probs.div(race).argmax(dim=-1)                                                 # [B]


@torch.no_grad()  # not inference_mode: the learner later uses these tensors under autograd
def sample(model, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int, config: SamplingConfig,
           eos_token_ids: list[int], pad_token_id: int, generator: torch.Generator | None = None, greedy: bool = False,
           logits_hook: LogitsHook | None = None, prompt_indices: Tensor | None = None,
           make_decoder: DecoderFactory | None = None) -> Rollout:
    """Sample `group_size` completions for each left-padded prompt.

    prompt_ids, prompt_mask: [P, S]; prompt_indices [P]: the task's index of each prompt
    (handed to `logits_hook` and kept in the rollout). `make_decoder`: the forward used for
    decoding (default `transformers_decoder`). Returns a `Rollout` with B = P * group_size rows.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [P, S]; got {tuple(prompt_ids.shape)} "
                         f"and {tuple(prompt_mask.shape)}")
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
    temperature = 1.0 if greedy else config.temperature
    eos_ids = torch.tensor(eos_token_ids, device=device)  # [E]
    if prompt_indices is None:
        prompt_indices = torch.full((num_prompts,), -1, dtype=torch.long, device=device)
    row_prompt_indices = prompt_indices.to(device).repeat_interleave(group_size)  # [B]

    was_training = model.training
    model.eval()
    decoder = (make_decoder or transformers_decoder)(model, batch_size, prompt_length + max_new_tokens, config)
    logits = decoder.prefill(prompt_ids, prompt_mask, group_size)  # [B, V]

    completion_ids = torch.full((batch_size, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((batch_size, max_new_tokens), dtype=torch.bool, device=device)
    old_logprobs = torch.zeros((batch_size, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
    # The decoder holds only the rows still generating (`decoder_rows[a]`: the batch row of decoder row a);
    # finished rows are dropped once a quarter (CPU) or three quarters (GPU) are done (docs/engine.md).
    decoder_rows = torch.arange(batch_size, device=device)  # [A]
    check_every, compact_below = (1, 0.75) if device.type == "cpu" else (8, 0.25)

    steps_taken = 0
    for step in range(max_new_tokens):
        if logits_hook is not None:
            logits = logits_hook(logits[:, None], row_prompt_indices[decoder_rows],
                                 completion_ids[decoder_rows, : step + 1], step)[:, 0]  # [A, V]
        scaled = logits / temperature if temperature != 1.0 else logits  # [A, V] float32
        # log pi(i) = z_i - m - log sum_j exp(z_j - m): one exp pass, whose values are also the sampling weights
        maxes = scaled.amax(dim=-1, keepdim=True)  # [A, 1]
        weights = torch.sub(scaled, maxes).exp_()  # [A, V] exp(z - m), proportional to the softmax
        log_normaliser = weights.sum(dim=-1, keepdim=True).log_().add_(maxes)  # [A, 1] logsumexp(z)
        if greedy:
            tokens = scaled.argmax(dim=-1)  # [A]
        else:
            if config.top_k > 0 or config.top_p < 1.0:
                weights = filter_logits(scaled, config.top_k, config.top_p).softmax(dim=-1)
            tokens = sample_categorical(weights, generator=generator)  # [A]; exact, cheaper than multinomial
        alive = ~done[decoder_rows]  # [A] rows that had not finished before this step
        tokens = torch.where(alive, tokens, torch.full_like(tokens, pad_token_id))
        completion_ids[decoder_rows, step] = tokens
        completion_mask[decoder_rows, step] = alive
        old_logprobs[decoder_rows, step] = (scaled.gather(1, tokens[:, None]) - log_normaliser).squeeze(1) * alive
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
        prompt_indices=row_prompt_indices,
        ended_with_eos=done,
        temperature=temperature,
        logits_hook=logits_hook,
    )
