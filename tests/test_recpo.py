"""RecPO (algorithms/recpo.py): the fused reward, per-path advantages and their gradient weights, the
best-path choice and the item term, against numpy written here and the hand-computed values of
docs/recpo.md."""

import numpy as np
import pytest
import torch

from algorithms.recpo import RecPO, RecPOConfig, best_path_mask
from engine.learner import LearnerConfig, PolicyBatch, Rewards
from engine.logprobs import completion_logprobs
from engine.loss import policy_loss
from engine.rollout import SamplingConfig, sample
from fastdecode import fast_decoder
from tests.conftest import left_padded_prompts, make_model

# docs/recpo.md: one group of four paths
RANKING = [1.0, 0.63093, 0.38685, 0.22767]  # R_d of ranks 1, 2, 5, 20
PROBABILITY = [0.10, 0.05, 0.02, 0.001]  # R_c
FUSED = [0.95500, 0.60188, 0.36851, 0.21634]  # 0.05 R_c + 0.95 R_d
ADVANTAGES = [1.3049, 0.2067, -0.5192, -0.9924]  # unbiased std, eps 1e-8


def numpy_advantages(rewards, groups, scale="group", eps=1e-8):
    rewards, groups = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    advantages = np.zeros_like(rewards)
    for group in np.unique(groups):
        rows = groups == group
        values = rewards[rows]
        if scale == "group":
            advantages[rows] = (values - values.mean()) / (values.std(ddof=1) + eps)
        else:  # leave-one-out: baseline = mean of the other paths
            advantages[rows] = [value - np.delete(values, i).mean() for i, value in enumerate(values)]
    return advantages


def task_rewards(ranking, probability, targets, reached=None, hidden=None):
    rows = len(ranking)
    return Rewards(torch.tensor(ranking, dtype=torch.float32)[:, None], torch.ones(rows, 1, dtype=torch.bool),
                   {"catalog_probability": torch.tensor(probability, dtype=torch.float32),
                    "target_item": torch.tensor(targets),
                    "reached_answer": torch.ones(rows, dtype=torch.bool) if reached is None else torch.tensor(reached),
                    "user_hidden": torch.zeros(rows, 3) if hidden is None else hidden})


class IdentityItemTask:
    """An item head whose in-batch logits are the user hidden state itself: logit of candidate j = h[j]."""

    def item_logprobs(self, model, user_hidden, target_column, candidate_rows, encode):
        logits = user_hidden[:, : candidate_rows.numel()]  # [k, P]
        return logits.log_softmax(dim=1).gather(1, target_column[:, None]).squeeze(1)


def group_rollout(rows=4, length=3):
    """A stand-in for a rollout: one group of `rows` paths, each `length` tokens, all finished."""
    from engine.rollout import Rollout

    return Rollout(prompt_ids=torch.ones(rows, 2, dtype=torch.long), prompt_mask=torch.ones(rows, 2, dtype=torch.bool),
                   completion_ids=torch.ones(rows, length, dtype=torch.long),
                   completion_mask=torch.ones(rows, length, dtype=torch.bool),
                   old_logprobs=torch.zeros(rows, length), group_ids=torch.zeros(rows, dtype=torch.long),
                   prompt_indices=torch.zeros(rows, dtype=torch.long), ended_with_eos=torch.ones(rows, dtype=torch.bool),
                   temperature=1.0)


# ---------------------------------------------------------------------------
# reward, advantages, best paths
# ---------------------------------------------------------------------------


def test_fused_reward_advantages_and_best_path_oracle():
    strategy = RecPO(task=IdentityItemTask())
    rollout = group_rollout()
    rewards = strategy.shape_rewards(task_rewards(RANKING, PROBABILITY, [0, 1, 2, 0]), rollout)
    np.testing.assert_allclose(rewards.values[:, 0].numpy(), FUSED, atol=1e-5)
    unit_ids = strategy.unit_ids(rollout, rewards)
    advantages = strategy.advantages(rewards, rollout, unit_ids)  # [B, T]
    np.testing.assert_allclose(advantages.numpy(), np.repeat(np.array(ADVANTAGES)[:, None], 3, axis=1), atol=1e-4)
    assert best_path_mask(advantages[:, 0], rollout.group_ids).tolist() == [True, False, False, False]
    assert best_path_mask(advantages[:, 0], rollout.group_ids, top_k=2).tolist() == [True, True, False, False]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_reward_beta_and_the_ablations(beta):
    strategy = RecPO(RecPOConfig(reward_beta=beta), task=IdentityItemTask())
    generator = np.random.default_rng(int(beta * 10))
    ranking, probability = generator.random(6), generator.random(6) * 0.1
    fused = strategy.shape_rewards(task_rewards(ranking, probability, [0] * 6), group_rollout(6)).values[:, 0]
    np.testing.assert_allclose(fused.numpy(), beta * probability + (1 - beta) * ranking, rtol=1e-6)


@pytest.mark.parametrize("scale", ["group", "leave_one_out"])
def test_each_path_gets_its_own_advantage(scale):
    generator = np.random.default_rng(7)
    rewards = generator.random(12)
    groups = np.repeat([3, 1, 2], 4)
    strategy = RecPO(RecPOConfig(advantage_scale=scale, advantage_eps=1e-8, reward_beta=0.0), task=IdentityItemTask())
    rollout = group_rollout(12, length=5)
    rollout.group_ids = torch.tensor(groups)
    rollout.completion_mask[:, 3:] = torch.tensor(generator.random((12, 2)) < 0.5)
    shaped = strategy.shape_rewards(task_rewards(rewards, np.zeros(12), [0] * 12), rollout)
    advantages = strategy.advantages(shaped, rollout, strategy.unit_ids(rollout, shaped))
    expected = numpy_advantages(rewards, groups, scale)[:, None] * rollout.completion_mask.numpy()
    np.testing.assert_allclose(advantages.numpy(), expected, atol=1e-5)


def numpy_best_paths(advantages, groups, top_k):
    keep = np.zeros(len(advantages), dtype=bool)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        order = sorted(rows, key=lambda row: (-advantages[row], row))  # higher first, then earlier row
        keep[order[:top_k]] = True
    return keep


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_best_path_mask_matches_numpy_with_ties(top_k):
    generator = np.random.default_rng(top_k)
    advantages = np.round(generator.normal(size=24), 0)  # many ties
    groups = np.repeat(np.arange(6), 4)
    generator.shuffle(groups)
    mask = best_path_mask(torch.tensor(advantages), torch.tensor(groups), top_k=top_k)
    np.testing.assert_array_equal(mask.numpy(), numpy_best_paths(advantages, groups, top_k))
    assert mask.sum().item() == 6 * min(top_k, 4)


def test_best_path_ties_go_to_the_first_row():
    advantages = torch.tensor([0.5, 1.0, 1.0, -2.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    assert best_path_mask(advantages, groups).tolist() == [False, True, False, False, True, False]
    assert best_path_mask(advantages, groups, top_k=2).tolist() == [False, True, True, False, True, True]
    with pytest.raises(ValueError, match="top_k"):
        best_path_mask(advantages, groups, top_k=0)
    with pytest.raises(ValueError, match="NaN"):
        best_path_mask(torch.tensor([float("nan")]), torch.tensor([0]))


# ---------------------------------------------------------------------------
# gradient weights: each row its own advantage (the official code's broadcast fails this)
# ---------------------------------------------------------------------------


def test_token_gradient_weight_of_each_row_is_its_own_advantage(tokenizer):
    model = make_model(tokenizer, seed=3)
    ids, mask = left_padded_prompts(tokenizer, ["Sort these digits: 3 1 2", "Fargo (1996)"])
    rollout = sample(model, ids, mask, 4, SamplingConfig(max_new_tokens=6), [tokenizer.eos_token_id],
                     tokenizer.pad_token_id, torch.Generator().manual_seed(0), make_decoder=fast_decoder)
    rewards = np.array([0.9, 0.2, 0.4, 0.1, 0.0, 0.5, 0.3, 0.35])
    strategy = RecPO(RecPOConfig(reward_beta=0.0), task=IdentityItemTask())
    shaped = strategy.shape_rewards(task_rewards(rewards, np.zeros(8), [0] * 8), rollout)
    advantages = strategy.advantages(shaped, rollout, strategy.unit_ids(rollout, shaped))
    config = LearnerConfig(**{key.split(".")[1]: value for key, value in RecPO.defaults.items()
                              if key.startswith("learner.")})

    def gradients(row_weights=None):
        model.zero_grad(set_to_none=True)
        logprobs = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                       rollout.completion_mask).logprobs  # [B, T]
        if row_weights is None:  # what RecPO trains with
            loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, rollout.completion_mask, config)
        else:  # reference: sum_i w_i sum_t log pi(o_it)
            loss = (torch.tensor(row_weights, dtype=torch.float32)[:, None] * logprobs).sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    lengths = rollout.completion_mask.sum(dim=1).numpy()
    own = numpy_advantages(rewards, rollout.group_ids.numpy())  # [B]
    # seq_mean_token_mean at ratio 1: d loss / d log pi(o_it) = -A_i / (B |o_i|)
    expected = gradients(-own / (len(rewards) * lengths))
    torch.testing.assert_close(gradients(), expected, atol=1e-6, rtol=1e-4)
    # the official code's broadcast weights every row of a mini-batch (one group) by the group's mean advantage
    broadcast = gradients(-np.array([own[rollout.group_ids.numpy() == g].mean() for g in rollout.group_ids.numpy()])
                          / (len(rewards) * lengths))
    assert float((broadcast - expected).abs().max()) > 100 * float((gradients() - expected).abs().max()) + 1e-6


def test_item_term_trains_only_the_best_path_with_its_own_advantage():
    strategy = RecPO(task=IdentityItemTask())
    rollout = group_rollout()
    hidden = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3]])
    rewards = strategy.shape_rewards(task_rewards(RANKING, PROBABILITY, [5, 7, 9, 5], hidden=hidden), rollout)
    unit_ids = strategy.unit_ids(rollout, rewards)
    batch = PolicyBatch(rollout, rewards, unit_ids, strategy.advantages(rewards, rollout, unit_ids))
    strategy.begin_update(None, batch)
    assert strategy.item_batch["candidates"].tolist() == [5, 7, 9]  # the batch's distinct targets
    trained = hidden.clone().requires_grad_(True)
    loss = strategy.extra_loss(None, batch, torch.arange(4), trained)
    loss.backward()
    # docs/recpo.md: logits [1, 0, -1], target column 0, A = 1.3049 -> -A (onehot - p)
    np.testing.assert_allclose(trained.grad[0].numpy(), [-0.43683, 0.31935, 0.11748], atol=1e-4)
    assert trained.grad[1:].abs().sum() == 0  # the other paths train no item term
    assert float(loss.detach()) == pytest.approx(-1.3049, abs=1e-4)  # -A * ratio, ratio = 1


def test_item_gradient_weight_of_each_best_path_is_its_own_advantage():
    """relabel_topk = 2: rows 0 and 1 (A = 1.3049, 0.2067) train the item term, each with its own A; the official
    code's broadcast weights every row by the mini-batch mean of the masked advantages (docs/recpo.md §5)."""
    strategy = RecPO(RecPOConfig(relabel_topk=2), task=IdentityItemTask())
    rollout = group_rollout()
    hidden = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    rewards = strategy.shape_rewards(task_rewards(RANKING, PROBABILITY, [0, 1, 2, 0], hidden=hidden), rollout)
    unit_ids = strategy.unit_ids(rollout, rewards)
    batch = PolicyBatch(rollout, rewards, unit_ids, strategy.advantages(rewards, rollout, unit_ids))
    strategy.begin_update(None, batch)
    trained = hidden.clone().requires_grad_(True)
    strategy.extra_loss(None, batch, torch.arange(4), trained).backward()
    logits = hidden.double().numpy()  # candidates [0, 1, 2]: logit of candidate j = h[j]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # [4, 3]
    onehot = np.eye(3)[[0, 1, 2, 0]]  # target columns

    def weights_to_gradient(weights):  # d/dh of -sum_i w_i log p_i(target)
        return -np.asarray(weights)[:, None] * (onehot - probabilities)

    own = weights_to_gradient([ADVANTAGES[0], ADVANTAGES[1], 0.0, 0.0])
    np.testing.assert_allclose(trained.grad.numpy(), own, atol=1e-4)
    masked_mean = (ADVANTAGES[0] + ADVANTAGES[1]) / 4  # mean over the mini-batch of A * relabel_mask
    broadcast = weights_to_gradient([masked_mean] * 4)
    assert np.abs(trained.grad.numpy() - broadcast).max() > 0.05


def test_relabel_topk_and_paths_without_answer():
    strategy = RecPO(RecPOConfig(relabel_topk=2), task=IdentityItemTask())
    rollout = group_rollout()
    hidden = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    rewards = strategy.shape_rewards(task_rewards(RANKING, PROBABILITY, [0, 1, 2, 0], reached=[True, False, True, True],
                                                  hidden=hidden), rollout)
    unit_ids = strategy.unit_ids(rollout, rewards)
    batch = PolicyBatch(rollout, rewards, unit_ids, strategy.advantages(rewards, rollout, unit_ids))
    strategy.begin_update(None, batch)
    assert strategy.item_batch["trains_head"].tolist() == [True, False, False, False]  # path 1 has no <answer>
    trained = hidden.clone().requires_grad_(True)
    strategy.extra_loss(None, batch, torch.arange(4), trained).backward()
    assert trained.grad[0].abs().sum() > 0 and trained.grad[1:].abs().sum() == 0
    assert strategy.extra_loss(None, batch, torch.tensor([1, 2, 3]), trained[1:]) is None  # no best path in rows


def test_clear_errors():
    with pytest.raises(ValueError, match="item head"):
        RecPO(task=object())
    with pytest.raises(ValueError, match="extras"):
        RecPO(task=IdentityItemTask()).shape_rewards(Rewards.from_tensor(torch.ones(4)), group_rollout())
    for bad in ({"reward_beta": 1.5}, {"relabel_topk": 0}, {"item_clip_ratio_low": 1.0}):
        with pytest.raises(Exception, match=next(iter(bad))):
            RecPOConfig(**bad)
