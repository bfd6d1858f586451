"""GRPO (token unit) and GSPO (sequence unit): credit assignment against numpy, the GSPO objective
against the hand-computed oracles of docs/losses.md §2, and the paper defaults the experiments start from."""

import numpy as np
import pytest
import torch

from algorithms.base import token_unit_ids
from algorithms.grpo import GRPO, GSPO
from engine.learner import Rewards
from engine.loss import LossConfig, policy_loss, unit_mean
from engine.rollout import Rollout
from experiments.run import new_config

OLD = [[-1.3, -0.6, -1.7], [-0.9, -1.0, -0.15]]
NEW = [[-1.0, -0.5, -2.0], [-0.5, -1.3, -0.3]]
ADV = [0.5, -0.8]
FULL = [[1, 1, 1], [1, 1, 1]]
PAD = [[1, 1, 1], [1, 1, 0]]


def _rollout(mask, group_ids):
    mask = torch.tensor(mask, dtype=torch.bool)
    rows, length = mask.shape
    return Rollout(prompt_ids=torch.zeros(rows, 1, dtype=torch.long), prompt_mask=torch.ones(rows, 1, dtype=torch.bool),
                   completion_ids=torch.zeros(rows, length, dtype=torch.long), completion_mask=mask,
                   old_logprobs=torch.zeros(rows, length), group_ids=torch.tensor(group_ids),
                   prompt_indices=torch.tensor(group_ids), ended_with_eos=torch.ones(rows, dtype=torch.bool),
                   temperature=1.0)


def test_token_unit_ids():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert token_unit_ids(mask).tolist() == [[0, 1, -1], [0, 1, 2]]


@pytest.mark.parametrize("strategy", [GRPO(), GSPO()])
def test_sequence_advantages_against_numpy(strategy):
    rng = np.random.default_rng(0)
    mask = (np.arange(5)[None, :] < rng.integers(1, 6, size=(8, 1))).astype(bool)  # uneven lengths
    rollout = _rollout(mask, [0, 0, 0, 0, 1, 1, 1, 1])
    rewards = rng.random(8)
    packed = Rewards.from_tensor(torch.tensor(rewards, dtype=torch.float32))
    unit_ids = strategy.unit_ids(rollout, packed)
    advantages = strategy.advantages(packed, rollout, unit_ids).numpy()
    expected = np.zeros_like(advantages)
    for group in (slice(0, 4), slice(4, 8)):
        r = rewards[group]
        expected[group] = ((r - r.mean()) / (r.std(ddof=1) + 1e-4))[:, None] * mask[group]
    np.testing.assert_allclose(advantages, expected, atol=1e-5)
    if isinstance(strategy, GSPO):
        assert unit_ids.tolist() == np.where(mask, 0, -1).tolist() and strategy.num_units(packed) == 1
    else:
        assert unit_ids.tolist() == np.where(mask, np.arange(5)[None, :], -1).tolist()
    with pytest.raises(ValueError, match="one reward per completion"):
        strategy.advantages(Rewards.from_tensor(torch.ones(8, 3)), rollout, unit_ids)


def _gspo_loss(mask, low, high):
    """GSPO's objective: `policy_loss` with the strategy's sequence units and unit ratio."""
    rollout = _rollout(mask, [0, 1])
    logprobs = torch.tensor(NEW, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(OLD, dtype=torch.float64)
    advantages = torch.tensor(ADV, dtype=torch.float64)[:, None].expand(2, 3)
    unit_ids = GSPO().unit_ids(rollout, None)
    config = LossConfig(clip_ratio_low=low, clip_ratio_high=high, loss_agg_mode="seq_mean_token_mean")
    loss, metrics = policy_loss(logprobs, old, advantages, rollout.completion_mask, config, unit_ids=unit_ids,
                                ratio_level=GSPO.ratio_level)
    loss.backward()
    pooled = unit_mean(((logprobs - old) * rollout.completion_mask).detach(), unit_ids, num_units=1)
    return float(loss.detach()), logprobs.grad.numpy(), pooled.numpy(), metrics


def test_gspo_sequence_ratio_loss_and_gradient():
    loss, grad, pooled, metrics = _gspo_loss(FULL, 0.2, 0.28)
    np.testing.assert_allclose(pooled[:, 0], [0.033333, -0.016667], atol=1e-6)
    assert loss == pytest.approx(0.134915, abs=1e-6)
    # ratio statistics are those of the sequence ratios s_i, over the 6 tokens
    assert float(metrics["ratio_max"]) == pytest.approx(1.033895, abs=1e-6)
    assert float(metrics["ratio_min"]) == pytest.approx(0.983471, abs=1e-6)
    assert float(metrics["ratio_sum"]) == pytest.approx(3 * (1.033895 + 0.983471), abs=1e-5)
    loss, grad, pooled, _ = _gspo_loss(PAD, 0.2, 0.28)
    assert loss == pytest.approx(0.162035, abs=1e-6)
    np.testing.assert_allclose(grad, [[-0.086158] * 3, [0.210254, 0.210254, 0]], atol=1e-6)
    np.testing.assert_allclose(np.exp(pooled[:, 0]), [1.033895, 1.051271], atol=1e-6)


def test_gspo_paper_clip_range():
    loss, grad, _, metrics = _gspo_loss(FULL, 3e-4, 4e-4)
    assert loss == pytest.approx(0.149780, abs=1e-6)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)  # both sequences clipped
    assert float(metrics["clipped_tokens"]) == 6
    loss, grad, _, _ = _gspo_loss(PAD, 3e-4, 4e-4)
    assert loss == pytest.approx(0.170408, abs=1e-6)
    # Sequence 2: A < 0 and s > 1 + eps -> the pessimistic min keeps the unclipped branch.
    np.testing.assert_allclose(grad, [[0, 0, 0], [0.210254, 0.210254, 0]], atol=1e-6)


def test_experiments_start_from_the_papers_defaults():
    grpo = new_config("grpo_sort", False, ["learner.kl_coef=0.04"])  # grpo_sort itself turns the KL off
    assert (grpo.learner.clip_ratio_low, grpo.learner.clip_ratio_high) == (0.2, 0.2)  # DeepSeekMath
    assert grpo.learner.loss_agg_mode == "seq_mean_token_mean" and grpo.learner.kl_loss_type == "k3"
    assert new_config("grpo_sort", False, []).learner.kl_coef == 0.0
    gspo = new_config("gspo_sort", False, [])
    assert (gspo.learner.clip_ratio_low, gspo.learner.clip_ratio_high) == (3e-4, 4e-4)  # GSPO §5.1
    assert new_config("grpo_sort", False, ["algorithm=gspo"]).learner.clip_ratio_high == 4e-4  # a new algorithm's
