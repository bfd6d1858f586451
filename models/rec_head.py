"""The item-scoring head of R²ec and its item-embedding table (You et al., arXiv 2505.16994, §3.1; docs/recpo.md).

R²ec adds no new layer for recommendation: one decoder produces both the reasoning
tokens and the embeddings that are compared.

* user embedding h_T [H]: the last-layer (final-norm) hidden state at the last token
  of "prompt + reasoning + <answer>" (the learner's forward provides it);
* item embedding h_v [H]: the same backbone's last-layer hidden state at the last
  token of an item prompt whose assistant turn is prefilled with "<answer>" and not
  generated (`encode_items`);
* score, with temperature tau:
      cosine (official code):     s(u, v) = cos(h_T, h_v) / tau,   tau = 0.02
      dot    (paper's formula):   s(u, v) = h_T . h_v / tau
  (`ItemScorer`; scores are computed in float32 whatever the hidden dtype).

The item policy of the RecPO loss (paper Eq. 6) is a softmax over the target items
of the training batch, not over the catalogue:

      log pi(v+ | x_u, o) = s(u, v+) - log sum_{v' in batch targets} exp s(u, v')

(`ItemScorer.in_batch_item_logprobs`). The rewards use the whole catalogue
(rewards/recpo.py) through a table H_V [I, H] of item embeddings (`ItemTable`,
paper Algorithm 1): re-encoded in full every T_refresh steps (line 3, no gradient),
and between refreshes the rows of each batch's target items are overwritten with
their fresh embeddings (line 5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SIMILARITIES = ("cosine", "dot")
DEFAULT_PREFILL_ANSWER = "<answer>"


@dataclass
class RecHeadConfig:
    """Settings of the item-scoring head. Defaults are the official R²ec code's."""

    similarity: str = "cosine"  # "cosine" (official code) | "dot" (the paper's h_T . h_v / tau)
    temperature: float = 0.02  # tau
    learn_temperature: bool = False  # True: tau = exp(log_tau) is a trainable parameter, initialised at tau


class ItemScorer(nn.Module):
    """Scores s(u, v) = sim(h_u, h_v) / tau between user and item hidden states (module docstring)."""

    def __init__(self, config: RecHeadConfig | None = None):
        super().__init__()
        config = config or RecHeadConfig()
        if config.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {config.similarity!r}; choose one of {SIMILARITIES}")
        if not config.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {config.temperature}")
        self.config = config
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)))
        else:
            self.register_parameter("log_temperature", None)

    @property
    def temperature(self) -> Tensor | float:
        return self.log_temperature.exp() if self.log_temperature is not None else self.config.temperature

    def forward(self, user_hidden: Tensor, item_hidden: Tensor) -> Tensor:
        """user_hidden [B, H], item_hidden [I, H] -> scores [B, I] float32."""
        if user_hidden.dim() != 2 or item_hidden.dim() != 2:
            raise ValueError(f"user_hidden must be [B, H] and item_hidden [I, H]; got {tuple(user_hidden.shape)} "
                             f"and {tuple(item_hidden.shape)}")
        if user_hidden.shape[1] != item_hidden.shape[1]:
            raise ValueError(f"hidden sizes differ: users {user_hidden.shape[1]}, items {item_hidden.shape[1]}; "
                             "encode users and items with the same backbone")
        user_hidden = user_hidden.float()  # [B, H]
        item_hidden = item_hidden.to(user_hidden.device).float()  # [I, H]
        if self.config.similarity == "cosine":
            user_hidden = nn.functional.normalize(user_hidden, dim=-1)
            item_hidden = nn.functional.normalize(item_hidden, dim=-1)
        return user_hidden @ item_hidden.T / self.temperature  # [B, I]

    def in_batch_item_logprobs(self, user_hidden: Tensor, target_hidden: Tensor, target_index: Tensor) -> Tensor:
        """log pi(v+ | u) under the softmax over the batch's target items (paper Eq. 6), [B] float32.

        user_hidden [B, H]: one row per reasoning path; target_hidden [P, H]: the
        embeddings of the batch's target items (the candidates; pass each item once,
        a repeated item splits its probability); target_index [B] long: the column
        of each row's own target in target_hidden.
        """
        if target_index.shape != (user_hidden.shape[0],):
            raise ValueError(f"target_index must be [B] = [{user_hidden.shape[0]}], got {tuple(target_index.shape)}")
        num_targets = target_hidden.shape[0]
        if target_index.numel() and (int(target_index.min()) < 0 or int(target_index.max()) >= num_targets):
            raise ValueError(f"target_index must lie in [0, {num_targets}) (rows of target_hidden); got "
                             f"{target_index.min().item()}..{target_index.max().item()}")
        logits = self(user_hidden, target_hidden)  # [B, P]
        log_normaliser = torch.logsumexp(logits, dim=1)  # [B]
        return logits.gather(1, target_index.long().to(logits.device)[:, None]).squeeze(1) - log_normaliser


# ---------------------------------------------------------------------------
# item encoding
# ---------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_items(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    batch_size: int = 32,
    prefill_answer: str | Sequence[str] = DEFAULT_PREFILL_ANSWER,
    with_grad: bool = False,
) -> Tensor:
    """Item embeddings h_v, [N, H]: the last-layer hidden state at the last token of each item prompt.

    prompts: N chat conversations (role/content dicts) ending with the user turn.
    Each gets an assistant turn prefilled with `prefill_answer` (the chat template's
    continue-final-message form: no end-of-turn token after it); nothing is
    generated. `prefill_answer` is one text for every prompt or one per prompt (a
    user's written reasoning followed by "<answer>" gives that user's h_T). Batches
    of `batch_size` prompts are left-padded, so the last column is every prompt's
    last token; position ids are cumsum(mask) - 1. The model is
    reached only through its own forward (so DDP / FSDP / adapter wrappers work);
    `hidden_states[-1]` is the final-norm output (the decoder's last_hidden_state).
    `with_grad=False` runs under torch.no_grad (the full-table refresh); True keeps
    the graph (the batch targets of the item loss). The model's train/eval mode is
    left as the caller set it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no item prompts to encode; pass one chat (list of messages) per catalogue item")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (EOS is fine) before encoding")
    prefills = [prefill_answer] * len(prompts) if isinstance(prefill_answer, str) else list(prefill_answer)
    if len(prefills) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prefills)} prefilled answers; "
                         "pass one text, or one per prompt")
    texts = []
    for index, (messages, prefill) in enumerate(zip(prompts, prefills)):
        if not messages or messages[-1].get("role") == "assistant":
            raise ValueError(f"item prompt {index} must be a non-empty chat ending with a user turn; the assistant "
                             f"turn is added and prefilled with {prefill!r}")
        prefilled = list(messages) + [{"role": "assistant", "content": prefill}]
        texts.append(tokenizer.apply_chat_template(prefilled, tokenize=False, continue_final_message=True))
    device = _model_device(model)
    chunks = []
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=False, padding=True,
                                padding_side="left", return_tensors="pt")
            input_ids = encoded["input_ids"].to(device)  # [b, S]
            attention_mask = encoded["attention_mask"].to(device)  # [b, S], left-padded
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [b, S]
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            output_hidden_states=True, logits_to_keep=1, use_cache=False)
            chunks.append(outputs.hidden_states[-1][:, -1, :])  # [b, H]
    return torch.cat(chunks, dim=0)  # [N, H]


# ---------------------------------------------------------------------------
# the item-embedding table H_V
# ---------------------------------------------------------------------------


class ItemTable:
    """H_V [I, H] float32, no gradient: the whole catalogue's item embeddings (paper Algorithm 1).

    `refresh` re-encodes every item (line 3) and records the step and the seconds it
    took; `due(step, every)` says when (the table is empty, or step % every == 0 and
    it was not refreshed at this step already); `overwrite` puts freshly encoded
    rows of the batch's target items in (line 5). `state_dict` / `load_state_dict`
    round-trip the table exactly for resume.
    """

    def __init__(self, num_items: int, hidden_size: int):
        if num_items < 1 or hidden_size < 1:
            raise ValueError(f"an item table needs num_items >= 1 and hidden_size >= 1, got {num_items}, "
                             f"{hidden_size}")
        self.num_items = num_items
        self.hidden_size = hidden_size
        self._hidden: Tensor | None = None  # [I, H]
        self.last_refresh_step: int | None = None
        self.last_refresh_seconds: float | None = None

    @property
    def hidden(self) -> Tensor:
        """The table [I, H]; an error before the first refresh."""
        if self._hidden is None:
            raise RuntimeError("the item table is empty; call refresh(encode_fn, step) before scoring items")
        return self._hidden

    def _check_rows(self, hidden: Tensor, num_rows: int, what: str) -> None:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"{what} has shape {tuple(hidden.shape)} but the item table is built for hidden size "
                             f"{self.hidden_size}; build the table with the model's config.hidden_size "
                             "(a checkpoint or table from a different backbone cannot be reused)")
        if hidden.shape[0] != num_rows:
            raise ValueError(f"{what} has {hidden.shape[0]} rows, expected {num_rows}")

    def due(self, step: int, every: int) -> bool:
        """True when the table must be re-encoded at `step` (T_refresh = `every` >= 1)."""
        if every < 1:
            raise ValueError(f"the refresh interval must be >= 1 step, got {every}")
        if self._hidden is None:
            return True
        return step % every == 0 and step != self.last_refresh_step

    def refresh(self, encode_fn: Callable[[], Tensor], step: int) -> None:
        """Re-encode all items with `encode_fn() -> [I, H]` (run under no_grad); record the step and seconds."""
        started = time.perf_counter()
        with torch.no_grad():
            hidden = encode_fn()  # [I, H]
        self._check_rows(hidden, self.num_items, "the re-encoded table")
        self._hidden = hidden.detach().float()
        self.last_refresh_step = step
        self.last_refresh_seconds = time.perf_counter() - started

    def overwrite(self, item_ids: Tensor, hidden: Tensor) -> None:
        """H_V[item_ids] <- hidden (detached); item_ids [P] long, hidden [P, H]. A repeated id keeps its last row."""
        table = self.hidden  # [I, H]
        if item_ids.dim() != 1:
            raise ValueError(f"item_ids must be [P], got shape {tuple(item_ids.shape)}")
        self._check_rows(hidden, item_ids.shape[0], "the overwriting rows")
        if item_ids.numel() == 0:
            return
        item_ids = item_ids.long().to(table.device)
        if int(item_ids.min()) < 0 or int(item_ids.max()) >= self.num_items:
            raise ValueError(f"item ids must lie in [0, {self.num_items}); got {int(item_ids.min())}.."
                             f"{int(item_ids.max())}")
        positions = torch.arange(item_ids.shape[0], device=table.device)  # [P]
        last_position = torch.full((self.num_items,), -1, dtype=torch.long, device=table.device)
        last_position.scatter_reduce_(0, item_ids, positions, reduce="amax")  # [I]: last row of each id, or -1
        written = (last_position >= 0).nonzero().squeeze(1)  # [U]
        table[written] = hidden.detach().to(table)[last_position[written]]

    def state_dict(self) -> dict:
        return {
            "hidden": None if self._hidden is None else self._hidden.detach().cpu().clone(),
            "last_refresh_step": self.last_refresh_step,
            "last_refresh_seconds": self.last_refresh_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        hidden = state["hidden"]
        if hidden is not None:
            self._check_rows(hidden, self.num_items, "the saved item table")
            device = self._hidden.device if self._hidden is not None else hidden.device
            hidden = hidden.detach().float().clone().to(device)
        self._hidden = hidden
        self.last_refresh_step = state["last_refresh_step"]
        self.last_refresh_seconds = state["last_refresh_seconds"]
