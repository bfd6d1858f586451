"""Next-item requests on MovieLens-100K: one target item per request (RecPO, ReRec, GR2 tasks).

The split is the per-user temporal split of ``experiments.data.movielens``
(RecBole's 80/10/10 by time, the one ``baselines_ml100k`` evaluates on): each
user's interactions, oldest first, are cut into a train part [0, n_train), a
validation part [n_train, n_train + n_val) and a test part
[n_train + n_val, n).  A request at a cutoff c has

* history = the user's first c interactions, oldest first (every rated item,
  liked or not, with or without a year); ``seen`` = the distinct history items;
* liked history = the history items rated >= 4 that are recommendable (have
  a year, so they can be named in a prompt), oldest first;
* target = the first interaction at or after c, inside the request's target
  part, that is liked (rating >= 4), recommendable and not already seen.

Cutoffs and target parts per split:

* test: c = n_train + n_val, target inside the test part;
* val: c = n_train, target inside the validation part;
* train: every cutoff c in [max(1, min_history), n_train - 1], target inside
  the train part, so that no training target or history reaches the
  validation or test part; ``prefixes_per_user = k`` keeps k of the usable
  cutoffs (those that have a target), evenly spread, the latest always kept.
  Consecutive cutoffs may share a target (a disliked item just joins the
  history): they are distinct requests with different histories.

A request without a target is skipped; ``min_history`` applies to training
prefixes only (every validation and test user is kept, as in the baselines).
Requests come ordered by user id, then cutoff; everything is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiments.data.movielens import LIKED_RATING, MovieLensConversations, UserTimeline
from rewards.catalog import Item

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class NextItemRequest:
    """One next-item request (module docstring).

    Attributes:
        user_id: MovieLens user id.
        split: "train", "val" or "test".
        cutoff: number of the user's time-ordered interactions before the request.
        history_item_ids: every item rated before the cutoff, oldest first.
        liked_history_item_ids: the liked (rating >= 4), recommendable history items, oldest first.
        target_item_id: the item to predict.
        seen_item_ids: the distinct history items, in first-rated order (never a target).
    """

    user_id: int
    split: str
    cutoff: int
    history_item_ids: tuple[int, ...]
    liked_history_item_ids: tuple[int, ...]
    target_item_id: int
    seen_item_ids: tuple[int, ...]


def _target_finder(timeline: UserTimeline, recommendable: dict[int, Item], part_end: int):
    """A function cutoff -> target item id (or None) for targets in [cutoff, part_end).

    ``next_candidate[p]`` is the first position >= p (below part_end) holding a
    liked, recommendable item; a candidate already seen before the cutoff (its
    first position < cutoff) is passed over.
    """
    next_candidate = [part_end] * (part_end + 1)
    for position in range(part_end - 1, -1, -1):
        liked = timeline.ratings[position] >= LIKED_RATING and timeline.item_ids[position] in recommendable
        next_candidate[position] = position if liked else next_candidate[position + 1]
    first_position: dict[int, int] = {}
    for position, item_id in enumerate(timeline.item_ids[:part_end]):
        first_position.setdefault(item_id, position)

    def target(cutoff: int) -> int | None:
        position = next_candidate[cutoff]
        while position < part_end and first_position[timeline.item_ids[position]] < cutoff:
            position = next_candidate[position + 1]
        return timeline.item_ids[position] if position < part_end else None

    return target


def _request(
    timeline: UserTimeline, split: str, cutoff: int, target_item_id: int, recommendable: dict[int, Item]
) -> NextItemRequest:
    history = timeline.item_ids[:cutoff]
    liked = [item_id for item_id, rating in zip(history, timeline.ratings[:cutoff])
             if rating >= LIKED_RATING and item_id in recommendable]
    return NextItemRequest(
        user_id=timeline.user_id,
        split=split,
        cutoff=cutoff,
        history_item_ids=tuple(history),
        liked_history_item_ids=tuple(liked),
        target_item_id=target_item_id,
        seen_item_ids=tuple(dict.fromkeys(history)),
    )


def evenly_spread(values: list[int], count: int | None) -> list[int]:
    """``count`` of ``values`` at evenly spread positions, the last always kept (and the first when
    count >= 2), in their original order; all of them when ``count`` is None."""
    if count is None or count >= len(values):
        return list(values)
    if count <= 0:
        return []
    positions = np.linspace(len(values) - 1, 0, num=count).round().astype(int)  # from the last backwards
    return [values[position] for position in sorted(set(positions.tolist()))]


def next_item_requests(
    conversations: MovieLensConversations,
    split: str,
    prefixes_per_user: int | None = None,
    min_history: int = 5,
) -> list[NextItemRequest]:
    """The next-item requests of one split (rules in the module docstring).

    Args:
        conversations: the MovieLens set (its ``timelines`` hold the split).
        split: "train", "val" or "test".
        prefixes_per_user: train only: usable prefixes kept per user, or None for all.
        min_history: train only: the shortest history a training request may have.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if prefixes_per_user is not None and prefixes_per_user < 0:
        raise ValueError(f"prefixes_per_user must be >= 0 or None (every usable prefix), got {prefixes_per_user}")
    if min_history < 0:
        raise ValueError(f"min_history must be >= 0, got {min_history}")
    recommendable = conversations.recommendable_items
    requests: list[NextItemRequest] = []
    for timeline in conversations.timelines:
        if split == "train":
            target_of = _target_finder(timeline, recommendable, timeline.train_end)
            usable = [(cutoff, target) for cutoff in range(max(1, min_history), timeline.train_end)
                      if (target := target_of(cutoff)) is not None]
            kept = evenly_spread(list(range(len(usable))), prefixes_per_user)
            pairs = [usable[index] for index in kept]
        else:
            cutoff, part_end = ((timeline.train_end, timeline.val_end) if split == "val"
                                else (timeline.val_end, len(timeline.item_ids)))
            target = _target_finder(timeline, recommendable, part_end)(cutoff)
            pairs = [(cutoff, target)] if target is not None else []
        requests.extend(_request(timeline, split, cutoff, target, recommendable) for cutoff, target in pairs)
    return requests
