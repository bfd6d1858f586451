"""Loss math against hand-computed oracles (docs/losses.md) and numpy written here.

Every loss value goes through `engine.loss.policy_loss`, the one function the learner calls."""

import numpy as np
import pytest
import torch

from engine.loss import LossConfig, aggregate, clipped_surrogate, group_advantages, kl_penalty, policy_loss, unit_mean

OLD = [[-1.3, -0.6, -1.7], [-0.9, -1.0, -0.15]]
NEW = [[-1.0, -0.5, -2.0], [-0.5, -1.3, -0.3]]
REF = [[-1.2, -0.4, -2.0], [-0.5, -1.3, -0.4]]
ADV = [0.5, -0.8]
FULL = [[1, 1, 1], [1, 1, 1]]
PAD = [[1, 1, 1], [1, 1, 0]]


def _inputs(mask):
    logprobs = torch.tensor(NEW, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(OLD, dtype=torch.float64)
    advantages = torch.tensor(ADV, dtype=torch.float64)[:, None].expand(2, 3)
    return logprobs, old, advantages, torch.tensor(mask, dtype=torch.bool)


def _token_loss(mode, mask, low=0.2, high=0.28, clip_c=None, kl_coef=0.0, max_length=None):
    logprobs, old, advantages, mask_t = _inputs(mask)
    config = LossConfig(clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=clip_c, loss_agg_mode=mode,
                        loss_max_length=max_length, kl_coef=kl_coef)
    loss, _ = policy_loss(logprobs, old, advantages, mask_t, config, ref_logprobs=torch.tensor(REF, dtype=torch.float64))
    loss.backward()
    return float(loss.detach()), logprobs.grad.numpy()


def test_per_token_clipped_loss_matches_oracle():
    logprobs, old, advantages, _ = _inputs(FULL)
    loss, clipped = clipped_surrogate(logprobs - old, advantages, 0.2, 0.28)
    expected = [[-0.64, -0.552585, -0.370409], [1.19346, 0.64, 0.688566]]
    np.testing.assert_allclose(loss.detach().numpy(), expected, atol=1e-6)
    # (1,1): A>0, r>1.28 clipped; (2,2): A<0, r<0.8 clipped; the others are not.
    assert clipped.tolist() == [[True, False, False], [False, True, False]]


@pytest.mark.parametrize(
    "mode, mask, expected_loss, expected_grad",
    [
        ("seq_mean_token_mean", FULL, 0.159839, None),
        ("seq_mean_token_mean", PAD, 0.197866, [[0, -0.092098, -0.061735], [0.298365, 0, 0]]),
        ("token_mean", FULL, 0.159839, None),
        ("token_mean", PAD, 0.054093, [[0, -0.110517, -0.074082], [0.238692, 0, 0]]),
        ("seq_mean_token_sum_norm", FULL, 0.119879, None),
        ("seq_mean_token_sum_norm", PAD, 0.033808, [[0, -0.069073, -0.046301], [0.149182, 0, 0]]),
    ],
)
def test_aggregation_modes_match_oracle(mode, mask, expected_loss, expected_grad):
    loss, grad = _token_loss(mode, mask, max_length=4)
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    if expected_grad is not None:
        np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_symmetric_clip_and_kl_oracles():
    assert _token_loss("token_mean", FULL, 0.2, 0.2)[0] == pytest.approx(0.166505, abs=1e-6)
    assert _token_loss("token_mean", PAD, 0.2, 0.2)[0] == pytest.approx(0.062093, abs=1e-6)
    assert _token_loss("seq_mean_token_mean", FULL, kl_coef=0.1)[0] == pytest.approx(0.160318, abs=1e-6)
    assert _token_loss("seq_mean_token_mean", PAD, kl_coef=0.1)[0] == pytest.approx(0.198264, abs=1e-6)
    assert _token_loss("token_mean", PAD, kl_coef=0.1)[0] == pytest.approx(0.054571, abs=1e-6)


def test_kl_estimators_against_numpy():
    logprobs = torch.tensor(NEW, dtype=torch.float64)
    ref = torch.tensor(REF, dtype=torch.float64)
    d = np.array(REF) - np.array(NEW)
    np.testing.assert_allclose(kl_penalty(logprobs, ref, "k1").numpy(), -d)
    np.testing.assert_allclose(kl_penalty(logprobs, ref, "k2").numpy(), 0.5 * d**2)
    np.testing.assert_allclose(kl_penalty(logprobs, ref, "k3").numpy(), np.exp(d) - d - 1)
    np.testing.assert_allclose(
        kl_penalty(logprobs, ref, "k3").numpy(), [[0.018731, 0.005171, 0], [0, 0, 0.004837]], atol=1e-6
    )
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logprobs, ref, "k4")


def test_dual_clip_caps_negative_advantage_loss():
    # ratio e^1.5 = 4.48 with A = -1: plain PPO loss 4.48, dual clip caps it at c * |A| = 3.
    log_ratio = torch.tensor([[1.5, 1.5, -1.0]])
    advantages = torch.tensor([[-1.0, 1.0, -1.0]])
    loss, clipped = clipped_surrogate(log_ratio, advantages, 0.2, 0.2, clip_ratio_c=3.0)
    r = np.exp([1.5, 1.5, -1.0])
    expected = [min(max(r[0], 1.2), 3.0), -min(r[1], 1.2), min(max(r[2], 0.8), 3.0)]
    np.testing.assert_allclose(loss.numpy()[0], expected, rtol=1e-6)
    assert clipped.tolist() == [[True, True, True]]  # dual-capped, clipped high, clipped at 0.8
    with pytest.raises(ValueError, match="clip_ratio_c"):
        clipped_surrogate(log_ratio, advantages, 0.2, 0.2, clip_ratio_c=0.5)


def test_log_ratio_is_clamped_before_exp():
    loss, _ = clipped_surrogate(torch.tensor([[500.0]]), torch.tensor([[-1.0]]), 0.2, 0.2)
    assert torch.isfinite(loss).all() and float(loss) == pytest.approx(np.exp(20.0), rel=1e-5)


def test_on_policy_identity_ratio_is_one():
    logprobs, _, advantages, mask = _inputs(FULL)
    config = LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="seq_mean_token_mean")
    loss, metrics = policy_loss(logprobs, logprobs.detach(), advantages, mask, config)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.15)  # -mean_i A_i
    assert float(metrics["clipped_tokens"]) == 0 and float(metrics["ratio_max"]) == float(metrics["ratio_min"]) == 1
    np.testing.assert_allclose(logprobs.grad.numpy(), -np.array(ADV)[:, None] / (3 * 2) * np.ones((2, 3)))


def test_micro_batch_normalisers():
    # Two micro-batches of one row each, global normalisers: token_mean sums to the global token mean.
    logprobs, old, advantages, mask = _inputs(PAD)
    config = LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token_mean")

    def part(i, **normalisers):
        rows = slice(i, i + 1)
        return float(policy_loss(logprobs[rows].detach(), old[rows], advantages[rows], mask[rows], config,
                                 **normalisers)[0])

    summed = sum(part(i, num_tokens=float(mask.sum()), num_sequences=2) for i in range(2))
    assert summed == pytest.approx(0.054093, abs=1e-6)
    local = sum(part(i) for i in range(2)) / 2
    assert local == pytest.approx(0.197866, abs=1e-6)  # TRL's bnpo: local normaliser


def test_group_advantages_oracles():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(group_advantages(rewards, groups, "group").numpy(),
                               [1.224445, -1.224445, 0, 0, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(group_advantages(rewards, groups, "none").numpy(),
                               [0.5, -0.5, 0, 0, 0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(group_advantages(rewards, groups, "group", eps=1e-6).numpy()[:2],
                               [1.224742, -1.224742], atol=1e-6)
    np.testing.assert_allclose(group_advantages(rewards, groups, "batch").numpy(),
                               [1.322526, -1.322526, 0, 0, 0, 0, 0, 0], atol=1e-6)


def test_group_advantages_per_rank_and_random_against_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.random((12, 5))
    groups = np.repeat([2, 7, 3], 4)  # arbitrary ids, contiguous groups
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups), "group").numpy()
    for g in np.unique(groups):
        block = rewards[groups == g]
        expected = (block - block.mean(0)) / (block.std(0, ddof=1) + 1e-4)
        np.testing.assert_allclose(got[groups == g], expected, rtol=1e-5, atol=1e-6)
    # Worked example A of docs/rank_grpo.md §8 (exp_inf hits): per-rank normalisation across the group.
    hits = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.float32)
    np.testing.assert_allclose(
        group_advantages(hits, torch.zeros(4, dtype=torch.long)).numpy(),
        [[0.865875, -0.865875, 0], [-0.865875, 0.865875, 0], [-0.865875, -0.865875, 0], [0.865875, 0.865875, 0]],
        atol=1e-6,
    )


def numpy_leave_one_out(rewards, groups):
    advantages = np.zeros_like(rewards)
    for i in range(len(rewards)):
        others = [rewards[j] for j in range(len(rewards)) if j != i and groups[j] == groups[i]]
        advantages[i] = rewards[i] - np.mean(others) if others else 0.0
    return advantages


def test_leave_one_out_matches_numpy():
    generator = np.random.default_rng(5)
    rewards = generator.random(11)
    groups = np.array([2, 0, 2, 1, 0, 1, 2, 0, 2, 7, 1])  # unsorted, sizes 4, 3, 3 and 1
    advantages = group_advantages(torch.tensor(rewards), torch.tensor(groups), "leave_one_out")
    np.testing.assert_allclose(advantages.numpy(), numpy_leave_one_out(rewards, groups), atol=1e-6)
    assert advantages[9].item() == 0.0  # a group of one has no baseline


def test_leave_one_out_oracle():
    # the fused RecPO rewards of docs/recpo.md's worked example (R = 0.05 R_c + 0.95 R_d)
    rewards = torch.tensor([0.95500, 0.60188, 0.36851, 0.21634])
    advantages = group_advantages(rewards, torch.zeros(4, dtype=torch.long), "leave_one_out")
    mean = 0.5354325
    expected = [4 / 3 * (r - mean) for r in rewards.tolist()]  # G/(G-1)(R - mean), not the code's R(1+1/G) - mean
    np.testing.assert_allclose(advantages.numpy(), expected, atol=1e-5)
    assert advantages.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_group_advantages_reject_nan():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_unit_mean_against_numpy_and_gradient():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 7))
    unit_ids = np.array([[0, 0, 1, 1, 1, 2, -1], [0, 1, 1, 1, 3, 3, 3], [-1, -1, -1, -1, -1, -1, -1]])
    tensor = torch.tensor(values, requires_grad=True)
    pooled = unit_mean(tensor, torch.tensor(unit_ids), num_units=4)
    expected = np.zeros_like(values)
    for row in range(3):
        for unit in set(unit_ids[row]) - {-1}:
            members = unit_ids[row] == unit
            expected[row, members] = values[row, members].mean()
    np.testing.assert_allclose(pooled.detach().numpy(), expected)
    pooled.sum().backward()  # each token of a unit of size n: n * (1/n) = 1; no credit: 0
    np.testing.assert_allclose(tensor.grad.numpy(), (unit_ids >= 0).astype(float))


def test_seq_mean_unit_mean_matches_rank_grpo_paper_example_b():
    # Worked example B of docs/rank_grpo.md §8: one sequence, rank-1 tokens logp-old
    # [0.10, -0.05, 0.02], rank-2 tokens [0.30, 0.00]; A = [0.8, -0.5]; eps (0.06, 0.08).
    log_ratio = torch.tensor([[0.10, -0.05, 0.02, 0.30, 0.00]])
    unit_ids = torch.tensor([[0, 0, 0, 1, 1]])
    advantages = torch.tensor([[0.8, 0.8, 0.8, -0.5, -0.5]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    pooled = unit_mean(log_ratio, unit_ids, num_units=2)
    np.testing.assert_allclose(pooled[0, [0, 3]].numpy(), [0.023333, 0.15], atol=1e-6)

    def loss(mode):
        config = LossConfig(clip_ratio_low=0.06, clip_ratio_high=0.08, loss_agg_mode=mode)
        return float(policy_loss(log_ratio, torch.zeros_like(log_ratio), advantages, mask, config,
                                 unit_ids=unit_ids, ratio_level="unit", num_units=2)[0])

    assert loss("seq_mean_unit_mean") == pytest.approx(-0.118985, abs=1e-6)  # the paper's
    assert loss("token_mean") == pytest.approx(-0.258965, abs=1e-6)  # the official code's


def test_unknown_aggregation_mode():
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), "sum")
    with pytest.raises(ValueError, match="loss_agg_mode='sum': choose one of token_mean"):
        LossConfig(loss_agg_mode="sum")


def test_policy_loss_rejects_mismatched_shapes_and_missing_inputs():
    logprobs, old, advantages, mask = _inputs(FULL)
    with pytest.raises(ValueError, match="must all be"):
        policy_loss(logprobs, old[:, :2], advantages, mask, LossConfig())
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old, advantages, mask, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="unit_ids"):
        policy_loss(logprobs, old, advantages, mask, LossConfig(), ratio_level="unit")
