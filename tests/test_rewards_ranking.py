"""Rank rewards, sequence reward and Recall/NDCG against hand-computed values and docs/rank_grpo.md §8."""

import math

import numpy as np
import pytest

from experiments.data.common import RecExample
from rewards.catalog import Catalog, Item
from rewards.ranking import discounts, evaluate_list, mean_metrics, rank_rewards, sequence_ndcg

HITS_EXAMPLE_A = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]])


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """Per-rank group normalisation (docs/rank_grpo.md §4): unbiased std, + 1e-4 on the std."""
    mean = rewards.mean(axis=0)
    std = rewards.std(axis=0, ddof=1)
    return (rewards - mean) / (std + 1e-4)


def test_discounts_match_hand_values():
    np.testing.assert_allclose(discounts(3), [1.0, 0.630930, 0.5], atol=1e-6)


def test_log_decay_rewards_example_a():
    rewards = rank_rewards(HITS_EXAMPLE_A, "log_decay")
    expected = [[1, 0, 0], [0.630930, 0.630930, 0], [0, 0, 0], [1.630930, 0.630930, 0]]
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    for row, hits in zip(rewards, HITS_EXAMPLE_A):  # the 1-D form agrees
        np.testing.assert_allclose(rank_rewards(hits, "log_decay"), row)


def test_exp_inf_advantages_example_a():
    rewards = rank_rewards(HITS_EXAMPLE_A, "exp_inf")
    np.testing.assert_array_equal(rewards, HITS_EXAMPLE_A)
    advantages = group_advantages(rewards)
    np.testing.assert_allclose(rewards.mean(axis=0), [0.5, 0.5, 0])
    np.testing.assert_allclose(rewards.std(axis=0, ddof=1), [0.577350, 0.577350, 0], atol=1e-6)
    a = 0.865875
    np.testing.assert_allclose(advantages, [[a, -a, 0], [-a, a, 0], [-a, -a, 0], [a, a, 0]], atol=1e-5)


def test_log_decay_advantages_example_a():
    rewards = rank_rewards(HITS_EXAMPLE_A, "log_decay")
    np.testing.assert_allclose(rewards.mean(axis=0), [0.815465, 0.315465, 0], atol=1e-6)
    np.testing.assert_allclose(rewards.std(axis=0, ddof=1), [0.682660, 0.364267, 0], atol=1e-6)
    expected = [
        [0.270278, -0.865788, 0],
        [-0.270278, 0.865788, 0],
        [-1.194366, -0.865788, 0],
        [1.194366, 0.865788, 0],
    ]
    np.testing.assert_allclose(group_advantages(rewards), expected, atol=1e-5)


def test_exp_gamma_recursion_and_limits():
    hits = [1, 0, 1, 1]
    gamma = 2.0
    expected = [1 + 0 / 2 + 1 / 4 + 1 / 8, 0 + 1 / 2 + 1 / 4, 1 + 1 / 2, 1]
    np.testing.assert_allclose(rank_rewards(hits, "exp_gamma", gamma=gamma), expected)
    np.testing.assert_allclose(rank_rewards(hits, "exp_gamma", gamma=1e12), hits, atol=1e-9)
    with pytest.raises(ValueError):
        rank_rewards(hits, "exp_gamma", gamma=1.0)
    with pytest.raises(ValueError):
        rank_rewards(hits, "exp_gamma")
    with pytest.raises(ValueError):
        rank_rewards(hits, "bogus")


def test_rewards_are_causal():
    """Changing an earlier hit never changes the reward of a later rank."""
    for kind, gamma in (("exp_inf", None), ("exp_gamma", 3.0), ("log_decay", None)):
        base = rank_rewards([0, 0, 1, 0, 1], kind, gamma)
        changed = rank_rewards([1, 1, 1, 0, 1], kind, gamma)
        np.testing.assert_allclose(base[2:], changed[2:])


def test_sequence_ndcg():
    d = 1 / np.log2(np.arange(2, 6))
    assert sequence_ndcg([1, 0, 0, 0]) == pytest.approx(1 / d.sum())
    assert sequence_ndcg([1, 0, 1, 0], num_relevant=2) == pytest.approx((d[0] + d[2]) / (d[0] + d[1]))
    assert sequence_ndcg([1, 1, 0, 0], num_relevant=2) == pytest.approx(1.0)
    assert sequence_ndcg([0, 0, 0, 0], num_relevant=3) == 0.0
    assert sequence_ndcg([1, 0], num_relevant=0) == 0.0


CATALOG = Catalog([Item(f"Movie {index}", 2000 + index % 10) for index in range(40)])


def item(index: int) -> Item:
    return Item(f"Movie {index}", 2000 + index % 10)


def lines(*indices: int) -> str:
    return "\n".join(f"{item(index).title} ({item(index).year})" for index in indices)


def dcg(hit_positions):
    return sum(1 / math.log2(position + 2) for position in hit_positions)


def idcg(count):
    return dcg(range(count))


def test_metrics_groundtruth_larger_than_k():
    example = RecExample("x", [], groundtruth=[item(index) for index in range(8)], seen=[])
    # hits at positions 0 and 3 within the first 5; 6 more items after
    text = lines(0, 20, 21, 1, 22, 2, 23, 24, 25, 26, 3)
    metrics = evaluate_list(text, example, CATALOG, ks=(5, 10, 20))
    assert metrics["recall@5"] == pytest.approx(2 / 8)
    assert metrics["ndcg@5"] == pytest.approx(dcg([0, 3]) / idcg(5))
    assert metrics["recall@10"] == pytest.approx(3 / 8)
    assert metrics["ndcg@10"] == pytest.approx(dcg([0, 3, 5]) / idcg(8))
    assert metrics["recall@20"] == pytest.approx(4 / 8)
    assert metrics["ndcg@20"] == pytest.approx(dcg([0, 3, 5, 10]) / idcg(8))


def test_metrics_groundtruth_smaller_than_k():
    example = RecExample("x", [], groundtruth=[item(1), item(2)], seen=[])
    metrics = evaluate_list(lines(20, 1, 21, 22, 23, 24, 2), example, CATALOG)
    assert metrics["recall@5"] == pytest.approx(1 / 2)
    assert metrics["ndcg@5"] == pytest.approx(dcg([1]) / idcg(2))
    assert metrics["recall@10"] == pytest.approx(1.0)
    assert metrics["ndcg@10"] == pytest.approx(dcg([1, 6]) / idcg(2))
    perfect = evaluate_list(lines(1, 2), example, CATALOG)
    assert perfect["ndcg@5"] == pytest.approx(1.0) and perfect["recall@20"] == 1.0


def test_metrics_duplicates_seen_and_out_of_catalog_are_compacted():
    example = RecExample("x", [], groundtruth=[item(1), item(2)], seen=[item(5)])
    text = "\n".join([
        "Movie 5 (2005)",          # seen: removed
        "Not A Movie (1999)",      # out of catalog: removed
        "",                        # blank: removed
        "Movie 1 (2001)",          # hit at compacted position 0
        "movie 1 (2001)",          # duplicate: stays, scores 0 (position 1)
        "Movie 2 (2002)",          # hit at compacted position 2
    ])
    metrics = evaluate_list(text, example, CATALOG, ks=(5,))
    assert metrics["recall@5"] == pytest.approx(1.0)
    assert metrics["ndcg@5"] == pytest.approx(dcg([0, 2]) / idcg(2))


def test_metrics_year_boundary():
    catalog = Catalog([Item("Heat", 1995)])
    example = RecExample("x", [], groundtruth=[Item("Heat", 1995)], seen=[])
    assert evaluate_list("Heat (1997)", example, catalog)["recall@5"] == 1.0
    assert evaluate_list("Heat (1993)", example, catalog)["recall@5"] == 1.0
    assert evaluate_list("Heat (1998)", example, catalog)["recall@5"] == 0.0
    assert evaluate_list("Heat (1992)", example, catalog)["recall@5"] == 0.0
    assert evaluate_list("Heat", example, catalog)["recall@5"] == 0.0  # no year: never a hit


def test_metrics_keep_titles_with_and_without_article_apart():
    catalog = Catalog([Item("Fall", 2022), Item("The Fall", 2022), Item("Heat", 1995)])
    example = RecExample("x", [], groundtruth=[Item("The Fall", 2022)], seen=[Item("Fall", None)])
    # the seen "Fall" is compacted away, "The Fall" is not: it is the hit at compacted position 0
    metrics = evaluate_list("Fall (2022)\nThe Fall (2022)\nHeat (1995)", example, catalog, ks=(5,))
    assert metrics["recall@5"] == 1.0 and metrics["ndcg@5"] == pytest.approx(1.0)
    # "Fall" is a different movie: not a hit for the ground truth "The Fall"
    unseen = RecExample("y", [], groundtruth=[Item("The Fall", 2022)], seen=[])
    metrics = evaluate_list("Fall (2022)\nHeat (1995)\nThe Fall (2022)", unseen, catalog, ks=(5,))
    assert metrics["recall@5"] == 1.0 and metrics["ndcg@5"] == pytest.approx(dcg([2]) / idcg(1))


def test_metrics_accept_items_and_empty_groundtruth():
    example = RecExample("x", [], groundtruth=[item(1)], seen=[])
    assert evaluate_list([item(1)], example, CATALOG)["ndcg@5"] == pytest.approx(1.0)
    assert evaluate_list(["Movie 1 (2001)", None], example, CATALOG)["recall@5"] == 1.0
    empty = RecExample("y", [], groundtruth=[], seen=[])
    assert set(evaluate_list(lines(1), empty, CATALOG).values()) == {0.0}


def test_mean_metrics():
    assert mean_metrics([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}]) == {"a": 0.5, "b": 0.5}
    assert mean_metrics([]) == {}
    with pytest.raises(ValueError):
        mean_metrics([{"a": 1.0}, {"b": 1.0}])


def test_rewards_package_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, rewards, rewards.catalog, rewards.lists, rewards.ranking; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"
