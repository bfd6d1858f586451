"""The strategy protocol: what unit of the completion gets the credit.

A strategy answers two questions; the shared core does the rest (engine/learner.py calls
engine/loss.py's `policy_loss`: clipped ratio, KL, aggregation, optimisation):

* `unit_ids(rollout, rewards) -> [B, T]`: which credit unit each completion token belongs
  to (-1 for tokens that get no credit, e.g. padding).
* `advantages(rewards, rollout, unit_ids) -> [B, T]`: the advantage of each token,
  constant inside a unit.

and declares three facts: `ratio_level` ("token": each token its own importance ratio;
"unit": the unit's geometric-mean ratio, as GSPO and Rank-GRPO), `reward_shapes`, the kinds
of reward it learns from (keys of `REWARD_SHAPES`; a task config's `reward_shape()` says
which kind it gives, and experiments refuse a mismatch before any work), and `defaults`,
its paper's values of the other settings (clip range, KL coefficient and type, aggregation),
as dotted config keys that the experiments start from. Its own options are the fields of
its `Config` dataclass.

Rewards arrive as `engine.learner.Rewards`: values [B, U] with a mask [B, U], U units per
row (1 for one reward per completion, N ranks, or a variable number of segments), plus
named per-row `extras` from the task.

Optional hooks, each with a neutral default:

* `num_units(rewards)`: the divisor N of `loss_agg_mode = seq_mean_unit_mean`.
* `shape_rewards(rewards, rollout)`: reward shaping that needs the rollout (DAPO's overlong
  penalty); it sees `rollout.prompt_indices`, so it can also keep per-prompt statistics.
* `keep_groups(rewards, rollout) -> [P] bool | None`: dynamic sampling; `None` keeps all.
* `order_prompts(epoch, order) -> order`: reorder or drop the prompts of a new epoch (a curriculum).
* `hidden_positions(batch) -> [B] long | None`: completion columns whose last-layer hidden state
  the learner should return (from the same forward as the log-probs) to `extra_loss`.
* `begin_update(model, batch)`: called once per update before the first optimizer step.
* `extra_loss(model, batch, rows, hidden) -> scalar | None`: a loss *summed* over the
  micro-batch `rows`, added to the policy loss (the learner divides by the step's rows).
* `module`: an `nn.Module` of the strategy's own trainable parameters (a head, a
  temperature): trained by the learner's optimizer, saved in checkpoints.
* `state_dict()` / `load_state_dict(state)`: everything to checkpoint (the module's
  parameters by default; a curriculum adds its statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.config import check, check_choice, is_finite_number
from engine.loss import ADVANTAGE_SCALES
from engine.rollout import Rollout


# The kinds of reward a task can give and a strategy can learn from (`Strategy.reward_shapes`).
REWARD_SHAPES = {
    "sequence": "one reward per completion",
    "ranks": "one reward per rank of the recommended list",
    "lines": "one reward per reasoning line, with the task's per-line penalty flags",
    "item_head": "one ranking reward per reasoning path, from a task with an item-scoring head",
}


@dataclass
class StrategyConfig:
    """Options every strategy has; a strategy's `Config` subclasses this."""

    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    advantage_eps: float = 1e-4  # added to the std

    def __post_init__(self) -> None:
        check_choice("advantage_scale", self.advantage_scale, ADVANTAGE_SCALES)
        check(is_finite_number(self.advantage_eps) and self.advantage_eps > 0, "advantage_eps", self.advantage_eps,
              "must be > 0: a group whose rewards are all equal has std 0, and its advantage 0 / (0 + eps) must be 0, "
              "not 0 / 0 (for no eps in effect, use a tiny value such as 1e-8)")


class Strategy:
    """Base class of all credit-unit strategies (see the module docstring)."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    defaults: ClassVar[dict[str, object]] = {}
    ratio_level: ClassVar[str] = "token"
    reward_shapes: ClassVar[tuple[str, ...]] = ("sequence",)  # keys of REWARD_SHAPES
    extra_loss_name: ClassVar[str | None] = None  # metric name of `extra_loss`, when a strategy has one

    def __init__(self, config: StrategyConfig | None = None, tokenizer=None, task=None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} takes a {self.Config.__name__}, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        self.task = task
        self.module: torch.nn.Module | None = None

    # --- the credit unit -------------------------------------------------
    def unit_ids(self, rollout: Rollout, rewards) -> Tensor:
        raise NotImplementedError

    def advantages(self, rewards, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def num_units(self, rewards) -> int | None:
        return None

    # --- optional hooks --------------------------------------------------
    def shape_rewards(self, rewards, rollout: Rollout):
        return rewards

    def keep_groups(self, rewards, rollout: Rollout) -> Tensor | None:
        return None

    def order_prompts(self, epoch: int, order: list[int]) -> list[int]:
        return order

    def hidden_positions(self, batch) -> Tensor | None:
        return None

    def begin_update(self, model, batch) -> None:
        return None

    def extra_loss(self, model, batch, rows: Tensor, hidden: Tensor | None) -> Tensor | None:
        return None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.module is None else list(self.module.parameters())

    def state_dict(self) -> dict:
        return {} if self.module is None else {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.module is not None:
            self.module.load_state_dict(state["module"])


def token_unit_ids(completion_mask: Tensor) -> Tensor:
    """Every completion token is its own unit: its position, -1 on padding. [B, T]"""
    positions = torch.arange(completion_mask.shape[1], device=completion_mask.device)  # [T]
    return torch.where(completion_mask.bool(), positions[None, :], torch.full_like(positions[None, :], -1))


def newline_counts(tokenizer) -> Tensor:
    """Number of "\\n" characters in the text of each vocabulary id, [V] long; 0 for special tokens.

    Each id is decoded alone, so merged tokens (")\\n", "\\n\\n") count every newline
    they hold. Byte pieces that are not valid UTF-8 on their own decode to U+FFFD,
    never to a newline (0x0A is a one-byte character), so they count 0.
    """
    vocab_size = len(tokenizer)
    texts = tokenizer.batch_decode([[token_id] for token_id in range(vocab_size)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    counts = torch.tensor([text.count("\n") for text in texts], dtype=torch.long)  # [V]
    special_ids = [i for i in tokenizer.all_special_ids if 0 <= i < vocab_size]
    if special_ids:
        counts[torch.tensor(special_ids)] = 0
    return counts


class LineSegmenter:
    """Token -> line ids from the tokenizer's newline counts, computed once per tokenizer.

    The line id of a completion token is the number of "\\n" characters in the tokens
    strictly before it, so a newline token belongs to the line it ends (a "\\n\\n" token
    advances the id by 2) and the EOS token to the last line; ids above `max_line` share
    the bin `max_line`; padding gets -1:

        line(t) = min( sum_{t' < t} newlines(y_t'), max_line )        [B, T]
    """

    def __init__(self, tokenizer):
        if tokenizer is None:
            raise ValueError("segmenting completions into lines counts newlines per token, so it needs the "
                             "tokenizer: build the strategy with tokenizer=...")
        self.counts = newline_counts(tokenizer)  # [V]

    def __call__(self, completion_ids: Tensor, completion_mask: Tensor, max_line: int) -> Tensor:
        counts = self.counts.to(completion_ids.device)
        mask = completion_mask.bool()  # [B, T]
        in_vocab = (completion_ids >= 0) & (completion_ids < counts.numel())  # ids beyond the tokenizer: no text
        token_newlines = counts[completion_ids.clamp(0, counts.numel() - 1)] * (in_vocab & mask)  # [B, T]
        before = token_newlines.cumsum(dim=1) - token_newlines  # [B, T] exclusive cumsum
        return torch.where(mask, before.clamp(max=max_line), torch.full_like(before, -1))
