"""RecPO rewards and advantages against numpy written here and hand-computed values (docs/recpo.md)."""

import math

import numpy as np
import pytest
import torch

from engine.loss import group_advantages
from algorithms.recpo import best_path_mask
from rewards.recpo import (
    catalog_probability,
    ndcg_reward,
    recpo_reward,
    target_ranks,
)


def numpy_rank(scores, target, excluded):
    """Pessimistic 1-based rank: 1 + candidates other than the target scoring >= the target."""
    count = 0
    for item, score in enumerate(scores):
        if item != target and not excluded[item] and score >= scores[target]:
            count += 1
    return 1 + count


def numpy_probability(scores, target, excluded):
    keep = ~excluded.copy()
    keep[target] = True
    shifted = np.exp(scores[keep] - scores[keep].max())
    return float(np.exp(scores[target] - scores[keep].max()) / shifted.sum())


def random_case(seed, rows=6, items=40, ties=False):
    generator = np.random.default_rng(seed)
    scores = generator.normal(size=(rows, items))
    if ties:
        scores = np.round(scores, 0)  # few distinct values: many ties
    targets = generator.integers(0, items, size=rows)
    history = generator.random((rows, items)) < 0.3
    history[0, targets[0]] = True  # a target inside its own history is still a candidate
    return scores, targets, history


def as_torch(scores, targets, history):
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(targets), torch.tensor(history)


@pytest.mark.parametrize("ties", [False, True])
def test_ranks_and_probabilities_match_numpy(ties):
    scores, targets, history = random_case(3 + ties, ties=ties)
    scores = scores.astype(np.float32).astype(np.float64)
    ranks = target_ranks(*as_torch(scores, targets, history))
    probabilities = catalog_probability(*as_torch(scores, targets, history))
    expected_ranks = [numpy_rank(s, t, h) for s, t, h in zip(scores, targets, history)]
    expected_probabilities = [numpy_probability(s, t, h) for s, t, h in zip(scores, targets, history)]
    assert ranks.dtype == torch.long
    np.testing.assert_array_equal(ranks.numpy(), expected_ranks)
    np.testing.assert_allclose(probabilities.numpy(), expected_probabilities, rtol=1e-5)


def test_history_items_are_skipped():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    target = torch.tensor([3])
    assert target_ranks(scores, target).tolist() == [4]
    history = torch.tensor([[True, False, True, False, False]])
    assert target_ranks(scores, target, history).tolist() == [2]  # items 0 and 2 no longer compete
    expected = math.exp(2) / (math.exp(4) + math.exp(2) + math.exp(1))
    assert catalog_probability(scores, target, history).item() == pytest.approx(expected, rel=1e-6)
    history_with_target = history.clone()
    history_with_target[0, 3] = True  # the target itself is never excluded
    assert target_ranks(scores, target, history_with_target).tolist() == [2]
    assert catalog_probability(scores, target, history_with_target).item() == pytest.approx(expected, rel=1e-6)


def test_ties_are_pessimistic():
    scores = torch.zeros(1, 6)  # a collapsed head: every item scores the same
    assert target_ranks(scores, torch.tensor([0])).tolist() == [6]
    assert target_ranks(scores, torch.tensor([5])).tolist() == [6]
    history = torch.tensor([[False, True, True, False, False, False]])
    assert target_ranks(scores, torch.tensor([0]), history).tolist() == [4]
    tied = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
    assert target_ranks(tied, torch.tensor([1])).tolist() == [2]  # item 3 ties with it and counts above


def test_ndcg_reward_oracle():
    ranks = torch.tensor([1, 2, 5, 20])
    np.testing.assert_allclose(ndcg_reward(ranks, k=1000).numpy(), [1.0, 0.63093, 0.38685, 0.22767], atol=1e-5)
    np.testing.assert_allclose(ndcg_reward(ranks, k=5).numpy(), [1.0, 0.63093, 0.38685, 0.0], atol=1e-5)
    assert ndcg_reward(torch.tensor([3]), k=2).item() == 0.0
    with pytest.raises(ValueError, match="1-based"):
        ndcg_reward(torch.tensor([0]))
    with pytest.raises(ValueError, match="k must be"):
        ndcg_reward(ranks, k=0)


def oracle_scores():
    """Scores of a 20-item catalogue = log(probabilities), built so that the targets (item 0)
    have ranks [1, 2, 5, 20] and catalogue probabilities [0.10, 0.05, 0.02, 0.001]."""
    rows = []
    for target_probability, higher in ((0.10, 0), (0.05, 1), (0.02, 4), (0.001, 19)):
        probabilities = np.empty(20)
        probabilities[0] = target_probability
        if higher == 19:
            probabilities[1:] = (1 - target_probability) / 19
        else:
            above = 0.5 if higher == 1 else 0.2 if higher == 4 else 0.0
            probabilities[1 : 1 + higher] = above
            rest = 1 - target_probability - above * higher
            probabilities[1 + higher :] = rest / (19 - higher)
        rows.append(np.log(probabilities))
    return torch.tensor(np.array(rows)), torch.zeros(4, dtype=torch.long)


def test_fused_reward_and_advantage_oracles():
    scores, targets = oracle_scores()
    assert target_ranks(scores, targets).tolist() == [1, 2, 5, 20]
    np.testing.assert_allclose(catalog_probability(scores, targets).numpy(), [0.10, 0.05, 0.02, 0.001], rtol=1e-5)
    rewards = recpo_reward(scores, targets, beta=0.05, k=1000)
    np.testing.assert_allclose(rewards.numpy(), [0.95500, 0.60188, 0.36851, 0.21634], atol=1e-5)
    group = torch.zeros(4, dtype=torch.long)
    advantages = group_advantages(rewards, group, eps=1e-8)  # the official code's eps
    np.testing.assert_allclose(advantages.numpy(), [1.3049, 0.2067, -0.5192, -0.9924], atol=1e-4)
    assert best_path_mask(advantages, group, top_k=1).tolist() == [True, False, False, False]
    assert best_path_mask(advantages, group, top_k=2).tolist() == [True, True, False, False]


def test_recpo_reward_matches_numpy_with_history():
    scores, targets, history = random_case(11, rows=5, items=30)
    scores = scores.astype(np.float32).astype(np.float64)
    beta, k = 0.3, 4
    expected = []
    for s, t, h in zip(scores, targets, history):
        rank = numpy_rank(s, t, h)
        ranking = 1 / np.log2(rank + 1) if rank <= k else 0.0
        expected.append(beta * numpy_probability(s, t, h) + (1 - beta) * ranking)
    rewards = recpo_reward(*as_torch(scores, targets, history), beta=beta, k=k)
    np.testing.assert_allclose(rewards.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise():
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta"):
        recpo_reward(scores, torch.tensor([0, 1]), beta=1.5)
    with pytest.raises(ValueError, match="target indices"):
        target_ranks(scores, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="history_mask"):
        target_ranks(scores, torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        target_ranks(scores, torch.tensor([0, 1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        catalog_probability(torch.tensor([[0.0, float("-inf"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        target_ranks(scores, torch.tensor([0]))
