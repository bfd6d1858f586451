"""The strategies recrl ships, by the name experiments use (`algorithm`)."""

from __future__ import annotations

from algorithms.base import Strategy
from algorithms.dapo import DAPO
from algorithms.grpo import GRPO, GSPO
from algorithms.rank_grpo import RankGRPO
from algorithms.recpo import RecPO
from algorithms.rerec import ReRec

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (GRPO, GSPO, DAPO, RankGRPO, RecPO, ReRec)}


def strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
