"""DAPO: overlong shaping against the hand-computed oracle (docs/losses.md §3), dynamic sampling's
group filter, its options, and the paper defaults the experiments start from."""

import numpy as np
import pytest
import torch

from algorithms.dapo import DAPO, DAPOConfig, overlong_penalty
from engine.config import ConfigError
from engine.learner import Rewards
from engine.rollout import Rollout
from experiments.run import new_config


def _rollout(lengths, group_ids):
    lengths = torch.tensor(lengths)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    rows = len(lengths)
    return Rollout(prompt_ids=torch.zeros(rows, 1, dtype=torch.long), prompt_mask=torch.ones(rows, 1, dtype=torch.bool),
                   completion_ids=torch.zeros(mask.shape, dtype=torch.long), completion_mask=mask,
                   old_logprobs=torch.zeros(mask.shape), group_ids=torch.tensor(group_ids),
                   prompt_indices=torch.tensor(group_ids), ended_with_eos=torch.ones(rows, dtype=torch.bool),
                   temperature=1.0)


def test_overlong_shaping_oracle():
    lengths = torch.tensor([5, 6, 7, 8, 10, 11])
    np.testing.assert_allclose(overlong_penalty(lengths, 10, 4).numpy(), [0, 0, -0.25, -0.5, -1.0, -1.0])
    paper = overlong_penalty(torch.tensor([16384, 18432, 20480]), 20480, 4096)
    np.testing.assert_allclose(paper.numpy(), [0, -0.5, -1.0])
    np.testing.assert_allclose(overlong_penalty(torch.tensor([10, 11]), 10, 0).numpy(), [0, -1.0])  # hard cut


def test_shape_rewards_adds_the_penalty_to_every_unit():
    rollout = _rollout([5, 7, 8, 11], [0, 0, 1, 1])
    rewards = Rewards.from_tensor(torch.tensor([1.0, 1.0, 0.0, 0.5]))
    shaped = DAPO(DAPOConfig(overlong_max_length=10, overlong_cache_length=4)).shape_rewards(rewards, rollout)
    np.testing.assert_allclose(shaped.values[:, 0].numpy(), [1.0, 0.75, -0.5, -0.5])
    assert DAPO().shape_rewards(rewards, rollout) is rewards  # no L_max: no shaping


def test_dynamic_sampling_keeps_groups_with_reward_spread():
    rollout = _rollout([3] * 6, [0, 0, 1, 1, 2, 2])
    rewards = Rewards.from_tensor(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.3]))
    assert DAPO().keep_groups(rewards, rollout).tolist() == [False, True, False]
    assert DAPO(DAPOConfig(dynamic_sampling=False)).keep_groups(rewards, rollout) is None


def test_options_are_checked():
    with pytest.raises(ConfigError, match="overlong_cache_length"):
        DAPOConfig(overlong_max_length=10, overlong_cache_length=11)
    with pytest.raises(ConfigError, match="overlong_max_length"):
        DAPOConfig(overlong_max_length=0)
    with pytest.raises(TypeError, match="DAPOConfig"):
        DAPO(object())


def test_experiments_start_from_the_papers_defaults():
    config = new_config("dapo_sort", False, [])
    assert (config.learner.clip_ratio_low, config.learner.clip_ratio_high) == (0.2, 0.28)  # clip-higher
    assert config.learner.loss_agg_mode == "token_mean" and config.learner.kl_coef == 0.0
    assert config.trainer.max_generation_rounds == 3
