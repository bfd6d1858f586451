"""Next-item requests: a hand-checked synthetic timeline, and no leakage / counts / determinism on ML-100K."""

import os
from pathlib import Path

import numpy as np
import pytest

from experiments.data.movielens import LIKED_RATING, Movie, MovieLensRatings, build_conversations, load_movielens
from experiments.data.next_item import NextItemRequest, evenly_spread, next_item_requests

SHARED_DATA = Path(os.environ.get("RECRL_DATA_DIR") or "/nonexistent-recrl-data")
needs_movielens = pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file(),
                                     reason="ML-100K not found under $RECRL_DATA_DIR")

# user 1: 20 interactions, items 1..20 in this order -> train positions 0..15, val 16..17, test 18..19
USER_1_RATINGS = [5, 3, 4, 2, 1, 3, 5, 2, 2, 4, 3, 3, 5, 1, 4, 2, 3, 5, 4, 5]
# user 2: 10 interactions (train 0..7, val 8, test 9); item 1 comes back at position 5
USER_2_ITEMS = [1, 2, 3, 4, 5, 1, 6, 7, 8, 9]
USER_2_RATINGS = [5, 3, 3, 3, 3, 5, 2, 4, 5, 5]


def synthetic_conversations():
    """Item 13 has no year (never a target, never in the liked history)."""
    users = [1] * 20 + [2] * 10
    items = list(range(1, 21)) + USER_2_ITEMS
    ratings = USER_1_RATINGS + USER_2_RATINGS
    times = list(range(20)) + list(range(10))
    movies = {item: Movie(item, f"Movie {item}", None if item == 13 else 2000 + item, f"Movie {item}")
              for item in range(1, 21)}
    table = MovieLensRatings(np.array(users), np.array(items), np.array(ratings, dtype=np.float32), np.array(times),
                             movies, {}, Path("synthetic"), "recbole")
    return build_conversations(table, list_length=3)


def test_hand_checked_timeline():
    conversations = synthetic_conversations()
    train = next_item_requests(conversations, "train")
    user_1 = [request for request in train if request.user_id == 1]
    # cutoffs 5..15; first liked, recommendable item at or after the cutoff inside positions 0..15:
    # c=5,6 -> item 7; c=7,8,9 -> item 10; c=10..14 -> item 15 (item 13 at position 12 has no year); c=15 -> none
    assert [request.cutoff for request in user_1] == list(range(5, 15))
    assert [request.target_item_id for request in user_1] == [7, 7, 10, 10, 10, 15, 15, 15, 15, 15]
    at_10 = user_1[5]
    assert at_10 == NextItemRequest(user_id=1, split="train", cutoff=10, history_item_ids=tuple(range(1, 11)),
                                    liked_history_item_ids=(1, 3, 7, 10), target_item_id=15,
                                    seen_item_ids=tuple(range(1, 11)))
    assert user_1[-1].liked_history_item_ids == (1, 3, 7, 10)  # item 13 (liked, no year) is left out
    # user 2: at c=5..7 the liked item 1 at position 5 was seen at position 0, so the target is item 7
    user_2 = [request for request in train if request.user_id == 2]
    assert [(request.cutoff, request.target_item_id) for request in user_2] == [(5, 7), (6, 7), (7, 7)]
    assert user_2[-1].history_item_ids == (1, 2, 3, 4, 5, 1, 6)
    assert user_2[-1].seen_item_ids == (1, 2, 3, 4, 5, 6)
    assert user_2[-1].liked_history_item_ids == (1, 1)

    val = next_item_requests(conversations, "val")
    assert [(request.user_id, request.cutoff, request.target_item_id) for request in val] == [(1, 16, 18), (2, 8, 8)]
    test = next_item_requests(conversations, "test")
    assert [(request.user_id, request.cutoff, request.target_item_id) for request in test] == [(1, 18, 19), (2, 9, 9)]
    assert test[0].history_item_ids == tuple(range(1, 19))


def test_prefixes_per_user_and_min_history():
    conversations = synthetic_conversations()
    kept = next_item_requests(conversations, "train", prefixes_per_user=4)
    # user 1: 10 usable cutoffs 5..14 -> positions 0, 3, 6, 9; user 2: 3 usable cutoffs, all kept
    assert [(request.user_id, request.cutoff) for request in kept] == [
        (1, 5), (1, 8), (1, 11), (1, 14), (2, 5), (2, 6), (2, 7)]
    assert [request.cutoff for request in next_item_requests(conversations, "train", prefixes_per_user=1)] == [14, 7]
    assert next_item_requests(conversations, "train", prefixes_per_user=0) == []
    late = next_item_requests(conversations, "train", min_history=13)
    assert [(request.user_id, request.cutoff) for request in late] == [(1, 13), (1, 14)]
    assert evenly_spread([10, 20, 30, 40, 50], 3) == [10, 30, 50]
    with pytest.raises(ValueError, match="split must be one of"):
        next_item_requests(conversations, "validation")
    with pytest.raises(ValueError, match="prefixes_per_user"):
        next_item_requests(conversations, "train", prefixes_per_user=-1)


@pytest.fixture(scope="module")
def conversations():
    return load_movielens(SHARED_DATA, download=False, progress=False)


@needs_movielens
def test_ml100k_no_leakage_and_counts(conversations):
    timelines = {timeline.user_id: timeline for timeline in conversations.timelines}
    parts = {"train": lambda t: (None, t.train_end), "val": lambda t: (t.train_end, t.val_end),
             "test": lambda t: (t.val_end, len(t.item_ids))}
    for split, part in parts.items():
        requests = next_item_requests(conversations, split)
        expected_users = 0
        for timeline in conversations.timelines:
            cutoff, end = part(timeline)
            if cutoff is not None:
                expected_users += any(rating >= LIKED_RATING and conversations.recommendable(item) for item, rating
                                      in zip(timeline.item_ids[cutoff:end], timeline.ratings[cutoff:end]))
        if split != "train":
            assert len(requests) == expected_users  # every user with a liked item in the part, once
        for request in requests:
            timeline = timelines[request.user_id]
            cutoff, end = part(timeline)
            cutoff = request.cutoff if cutoff is None else cutoff
            assert request.cutoff == cutoff and (split != "train" or 5 <= cutoff < timeline.train_end)
            assert request.history_item_ids == tuple(timeline.item_ids[:cutoff])
            # the target is the first liked, recommendable interaction inside [cutoff, end)
            position = timeline.item_ids.index(request.target_item_id, cutoff, end)
            assert timeline.ratings[position] >= LIKED_RATING and conversations.recommendable(request.target_item_id)
            assert not any(rating >= LIKED_RATING and conversations.recommendable(item) for item, rating in
                           zip(timeline.item_ids[cutoff:position], timeline.ratings[cutoff:position]))
            assert request.target_item_id not in request.seen_item_ids
    train = next_item_requests(conversations, "train")
    assert len(train) > 50 * len(next_item_requests(conversations, "test"))


@needs_movielens
def test_ml100k_deterministic(conversations):
    first = next_item_requests(conversations, "train", prefixes_per_user=3)
    reloaded = load_movielens(SHARED_DATA, download=False, progress=False)
    again = next_item_requests(reloaded, "train", prefixes_per_user=3)
    assert first == again
    assert len(first) <= 3 * len(conversations.timelines)
