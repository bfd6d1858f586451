"""Per-rank rewards, the GRPO sequence reward, and Recall@K / NDCG@K.

Notation: a list of N positions, 1-based rank j, hits rel_j in {0, 1}
(``rewards.catalog.rank_hits``), discount d_j = 1 / log2(j + 1) (so d_1 = 1).

Rank rewards (docs/rank_grpo.md §3), all causal: rank k is credited only
with ranks k..N, never with the ranks before it.

* ``exp_inf``  : r_k = rel_k                                   (Γ -> ∞; the paper's default)
* ``exp_gamma``: r_k = Σ_{j=k}^{N} rel_j Γ^{-(j-k)} = rel_k + r_{k+1} / Γ,  Γ > 1
* ``log_decay``: r_k = Σ_{j=k}^{N} rel_j d_j  (the DCG suffix with *absolute*
  positions j, not normalised by the IDCG)

Sequence reward for vanilla GRPO / GSPO: ``sequence_ndcg`` = NDCG@N of the list,
DCG@N / IDCG@N with IDCG over min(|GT|, N) ideal hits.

Evaluation metrics (docs/rank_grpo.md §5), for K in (5, 10, 20):

1. The parsed list is *compacted*: positions without an item, seen items and
   out-of-catalog items are removed first (duplicates stay and score 0).
2. Hits are matched on the compacted list (``rank_hits``: ground truth is a
   multiset, year within +-2, first qualifying recommendation wins).
3. Recall@K = (hits in the first K) / |GT|  (the denominator is |GT|, not min(K, |GT|)).
4. NDCG@K = DCG@K / IDCG@K, with DCG@K = Σ_{i=0}^{K-1} hit_i / log2(i + 2) and
   IDCG@K = Σ_{i=0}^{min(|GT|, K)-1} 1 / log2(i + 2).

An example with an empty ground truth scores 0 on every metric (the data
loaders never produce one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from rewards.catalog import Catalog, Item, SeenSet, rank_hits
from rewards.lists import parse_line, parse_list

RANK_REWARD_KINDS = ("exp_inf", "exp_gamma", "log_decay")
DEFAULT_KS = (5, 10, 20)


def discounts(n: int) -> np.ndarray:
    """d_j = 1 / log2(j + 1) for ranks j = 1..n, as a float64 array of shape [n]."""
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


def rank_rewards(hits: Sequence[int] | np.ndarray, kind: str = "exp_inf", gamma: float | None = None) -> np.ndarray:
    """Per-rank rewards r_1..r_N from hits (module docstring); works on [N] or batched [..., N].

    Args:
        hits: rel in {0, 1}, last axis = rank.
        kind: "exp_inf", "exp_gamma" or "log_decay".
        gamma: Γ > 1, required for (and only for) ``exp_gamma``.
    """
    relevance = np.asarray(hits, dtype=np.float64)
    if relevance.ndim == 0:
        raise ValueError("hits must have at least one dimension (the rank axis)")
    if kind == "exp_inf":
        return relevance.copy()
    if kind == "exp_gamma":
        if gamma is None or not gamma > 1:
            raise ValueError(f"exp_gamma needs gamma > 1, got {gamma}")
        rewards = np.zeros_like(relevance)
        suffix = np.zeros(relevance.shape[:-1])
        for rank in range(relevance.shape[-1] - 1, -1, -1):
            suffix = relevance[..., rank] + suffix / gamma
            rewards[..., rank] = suffix
        return rewards
    if kind == "log_decay":
        weighted = relevance * discounts(relevance.shape[-1])
        # suffix sums: r_k = Σ_{j>=k} rel_j d_j
        return np.flip(np.cumsum(np.flip(weighted, axis=-1), axis=-1), axis=-1).copy()
    raise ValueError(f"unknown rank reward kind {kind!r}; choose one of {RANK_REWARD_KINDS}")


def dcg(hits: Sequence[int] | np.ndarray) -> float:
    """DCG = Σ_{i=0}^{len-1} hit_i / log2(i + 2)."""
    relevance = np.asarray(hits, dtype=np.float64)
    return float(np.dot(relevance, discounts(len(relevance))))


def ideal_dcg(num_relevant: int, k: int) -> float:
    """IDCG@k = Σ_{i=0}^{min(num_relevant, k)-1} 1 / log2(i + 2)."""
    return float(discounts(max(0, min(num_relevant, k))).sum())


def sequence_ndcg(hits: Sequence[int] | np.ndarray, num_relevant: int | None = None) -> float:
    """NDCG@N of a hit vector of length N: DCG@N / IDCG@N, IDCG over min(num_relevant, N) ideal hits.

    ``num_relevant`` is |GT|; when None the ideal list is N hits.  Returns 0
    when there is nothing relevant.
    """
    relevance = np.asarray(hits, dtype=np.float64)
    length = len(relevance)
    ideal = ideal_dcg(length if num_relevant is None else num_relevant, length)
    return dcg(relevance) / ideal if ideal > 0 else 0.0


class ExampleLike(Protocol):
    groundtruth: Sequence[Item]
    seen: Sequence[Item]


def _items_of(text_or_items: str | Iterable[Item | str | None]) -> list[Item | None]:
    if isinstance(text_or_items, str):
        return [line.item for line in parse_list(text_or_items)]
    items: list[Item | None] = []
    for entry in text_or_items:
        if entry is None or isinstance(entry, Item):
            items.append(entry)
        elif isinstance(entry, str):
            items.append(parse_line(entry))
        else:
            items.append(Item(str(entry[0]), entry[1]))
    return items


def evaluate_list(
    text_or_items: str | Iterable[Item | str | None],
    example: ExampleLike,
    catalog: Catalog,
    ks: Sequence[int] = DEFAULT_KS,
    year_tolerance: int = 2,
) -> dict[str, float]:
    """Recall@K and NDCG@K of one generated list (definitions in the module docstring).

    Args:
        text_or_items: the generated text, or a sequence of ``Item``s / ``"Title (Year)"`` lines.
        example: anything with ``.groundtruth`` and ``.seen`` (e.g. a ``RecExample``).
        catalog: the item catalog.
        ks: cut-offs K.

    Returns:
        ``{"recall@5": .., "ndcg@5": .., "recall@10": .., ...}`` in the order of ``ks``.
    """
    seen = SeenSet(example.seen, year_tolerance, catalog.title_key)
    compacted = [
        item
        for item in _items_of(text_or_items)
        if item is not None and item not in seen and catalog.lookup(item) is not None
    ]
    largest_k = max(ks)
    hits = rank_hits(compacted, example.groundtruth, seen, catalog, largest_k, year_tolerance)
    num_relevant = len(example.groundtruth)
    metrics: dict[str, float] = {}
    for k in ks:
        top = hits[:k]
        if num_relevant == 0:
            metrics[f"recall@{k}"] = 0.0
            metrics[f"ndcg@{k}"] = 0.0
            continue
        metrics[f"recall@{k}"] = sum(top) / num_relevant
        metrics[f"ndcg@{k}"] = dcg(top) / ideal_dcg(num_relevant, k)
    return metrics


def mean_metrics(metric_dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Average each metric over examples (keys in first-seen order); {} for no examples.

    Raises:
        ValueError: the dicts do not all have the same keys.
    """
    totals: dict[str, float] = {}
    count = 0
    keys: tuple[str, ...] | None = None
    for metrics in metric_dicts:
        if keys is None:
            keys = tuple(metrics)
            totals = dict.fromkeys(keys, 0.0)
        elif set(metrics) != set(keys):
            raise ValueError(f"metric dicts disagree on keys: {sorted(keys)} vs {sorted(metrics)}")
        for key in keys:
            totals[key] += float(metrics[key])
        count += 1
    return {key: value / count for key, value in totals.items()} if count else {}
