"""The strategy interface: what unit of the completion gets the credit.

A strategy answers three questions, and the shared core (engine/learner.py) does
the rest (clipped ratio, KL, aggregation, optimisation):

* `unit_ids(rollout, tokenizer) -> [B, T]`: which credit unit each completion token
  belongs to (-1 for tokens that get no credit, e.g. padding).
* `advantages(rewards, rollout, unit_ids) -> [B, T]`: the advantage of each token,
  constant inside a unit.
* `pool_log_ratio(log_ratio, unit_ids) -> [B, T]`: the importance log-ratio each token
  uses: its own (token unit), or the mean over its unit (sequence / rank unit), i.e.
  the log of the geometric mean of the unit's token ratios.

Optional hooks with neutral defaults:

* `shape_rewards(rewards, rollout)`: reward shaping that needs the rollout (DAPO's
  overlong penalty).
* `keep_groups(rewards, rollout) -> [P] bool | None`: dynamic sampling; `None` keeps all.
* `extra_loss(batch, model_outputs)`: a loss added to the policy loss (RecPO's head).
* `num_units`: the N of `loss_agg_mode = seq_mean_unit_mean` (Rank-GRPO's paper form).

Strategies register by name with `@register_strategy("name")` and are built with
`make_strategy(name, **options)`.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor

from engine.loss import group_advantages
from engine.rollout import Rollout

_REGISTRY: dict[str, type["Strategy"]] = {}


class Strategy:
    """Base class of all credit-unit strategies (see the module docstring)."""

    name: ClassVar[str] = "base"
    num_units: int | None = None

    def __init__(self, advantage_scale: str = "group", advantage_eps: float = 1e-4):
        self.advantage_scale = advantage_scale
        self.advantage_eps = advantage_eps

    # --- the credit unit -------------------------------------------------
    def unit_ids(self, rollout: Rollout, tokenizer) -> Tensor:
        raise NotImplementedError

    def advantages(self, rewards: Tensor, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def pool_log_ratio(self, log_ratio: Tensor, unit_ids: Tensor) -> Tensor:
        raise NotImplementedError

    # --- optional hooks --------------------------------------------------
    def shape_rewards(self, rewards: Tensor, rollout: Rollout) -> Tensor:
        return rewards

    def keep_groups(self, rewards: Tensor, rollout: Rollout) -> Tensor | None:
        return None

    def extra_loss(self, batch, model_outputs) -> Tensor:
        return torch.zeros(())

    # --- shared helpers --------------------------------------------------
    def sequence_advantages(self, rewards: Tensor, rollout: Rollout) -> Tensor:
        """Group-normalised sequence rewards [B] broadcast to every completion token, [B, T]."""
        if rewards.dim() != 1:
            raise ValueError(
                f"{self.name} needs one reward per completion ([B]); got shape {tuple(rewards.shape)}. "
                "Per-rank rewards [B, N] belong to rank_grpo"
            )
        advantages = group_advantages(rewards, rollout.group_ids, self.advantage_scale, self.advantage_eps)  # [B]
        return advantages[:, None] * rollout.completion_mask  # [B, T]


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    def decorator(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def strategy_names() -> list[str]:
    _import_builtin_strategies()
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    _import_builtin_strategies()
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_strategy(name: str, **options) -> Strategy:
    return strategy_class(name)(**options)


def _import_builtin_strategies() -> None:
    # Importing the modules runs their @register_strategy decorators.
    import algorithms.dapo  # noqa: F401
    import algorithms.grpo  # noqa: F401
    import algorithms.rank_grpo  # noqa: F401
