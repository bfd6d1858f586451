"""Learner: gradient accumulation is exact, on-policy ratio is 1, PPO epochs, LR schedules, SFT."""

import math
import re

import pytest
import torch

from algorithms.grpo import GRPO, GSPO
from engine.config import ConfigError
from engine.learner import Learner, LearnerConfig, PolicyBatch, Rewards, lr_multiplier
from engine.rollout import SamplingConfig, sample
from engine.sft import SFTConfig, supervised_finetune
from models.loader import enable_activation_checkpointing
from tests.conftest import left_padded_prompts, make_model

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

PROMPTS = ["Sort these digits: 3 1 2", "Recommend movies like Heat (1995)", "Fargo"]


def _batch(model, tokenizer, strategy, group_size=4, seed=0):
    ids, mask = left_padded_prompts(tokenizer, PROMPTS)
    # An EOS that the random model emits now and then gives rows of uneven length.
    probe = sample(model, ids, mask, group_size, SamplingConfig(max_new_tokens=16), [-1], tokenizer.pad_token_id,
                   torch.Generator().manual_seed(seed))
    eos = int(probe.completion_ids.flatten().mode().values)
    rollout = sample(model, ids, mask, group_size, SamplingConfig(max_new_tokens=16), [eos], tokenizer.pad_token_id,
                     torch.Generator().manual_seed(seed))
    rewards = Rewards.from_tensor(torch.linspace(0.0, 1.0, rollout.num_rows).flip(0) ** 2)
    unit_ids = strategy.unit_ids(rollout, rewards)
    return PolicyBatch(rollout, rewards, unit_ids, strategy.advantages(rewards, rollout, unit_ids),
                       strategy.num_units(rewards))


def _gradients(tokenizer, batch, strategy, **config):
    model = make_model(tokenizer, "qwen2")
    learner = Learner(model, LearnerConfig(max_grad_norm=1e9, **config), strategy)
    captured = []
    learner.optimizer.step = lambda: captured.append([p.grad.clone() for p in model.parameters()])
    metrics = learner.update(batch)
    return captured, metrics


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_gradient_accumulation_equals_one_big_batch(tokenizer, qwen_model, mode):
    strategy = GRPO()
    batch = _batch(qwen_model, tokenizer, strategy)
    lengths = batch.rollout.completion_lengths
    assert lengths.unique().numel() > 1  # uneven lengths
    one, _ = _gradients(tokenizer, batch, strategy, micro_batch_size=12, loss_agg_mode=mode, loss_max_length=16)
    four, _ = _gradients(tokenizer, batch, strategy, micro_batch_size=3, loss_agg_mode=mode, loss_max_length=16)
    assert len(one) == len(four) == 1
    for full, accumulated in zip(one[0], four[0]):
        torch.testing.assert_close(accumulated, full, atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in one[0])


def test_on_policy_ratio_is_exactly_one_and_epochs_move_it(tokenizer, qwen_model):
    strategy = GSPO()
    batch = _batch(qwen_model, tokenizer, strategy)
    _, metrics = _gradients(tokenizer, batch, strategy, micro_batch_size=4, ppo_epochs=1,
                            clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    assert metrics["ratio_max"] == 1.0 and metrics["clip_frac"] == 0.0
    model = make_model(tokenizer, "qwen2")
    learner = Learner(model, LearnerConfig(lr=1e-2, micro_batch_size=4, ppo_epochs=3, clip_ratio_low=3e-4,
                                           clip_ratio_high=4e-4, loss_agg_mode="seq_mean_token_mean"), strategy)
    metrics = learner.update(batch)
    assert metrics["ratio_max"] > 1.0 and metrics["clip_frac"] > 0.0  # later epochs are off-policy


def test_kl_needs_reference_and_is_zero_against_itself(tokenizer, qwen_model):
    strategy = GRPO()
    batch = _batch(qwen_model, tokenizer, strategy)
    with pytest.raises(ValueError, match="reference model"):
        Learner(make_model(tokenizer), LearnerConfig(kl_coef=0.1), strategy)
    learner = Learner(make_model(tokenizer), LearnerConfig(kl_coef=0.1, lr=1e-8), strategy,
                      reference_model=make_model(tokenizer))
    assert learner.update(batch)["kl"] == pytest.approx(0.0, abs=1e-7)


def test_reference_offload_gives_the_same_update(tokenizer, qwen_model):
    """With reference_offload the reference is sent to the batch's device for its forward and
    back to CPU memory; the KL and the update are unchanged. (On CPU both moves are no-ops,
    so the moves are checked by recording them; tests/test_cuda.py checks real placement.)"""
    strategy = GRPO()
    batch = _batch(qwen_model, tokenizer, strategy)
    results = []
    for offload in (False, True):
        model = make_model(tokenizer)
        reference = make_model(tokenizer, seed=1)  # a different model: the KL is not zero
        learner = Learner(model, LearnerConfig(kl_coef=0.1, lr=1e-2, reference_offload=offload), strategy,
                          reference_model=reference)
        moves = []
        original_to = reference.to
        reference.to = lambda device, *args, **kwargs: moves.append(str(device)) or original_to(device, *args, **kwargs)
        metrics = learner.update(batch)
        assert moves == (["cpu", "cpu"] if offload else [])  # to the batch's device (cpu here), then back
        assert all(p.device.type == "cpu" for p in reference.parameters())
        results.append((metrics["kl"], [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] > 1e-3
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_non_finite_gradient_skips_the_step(tokenizer, qwen_model):
    strategy = GRPO()
    batch = _batch(qwen_model, tokenizer, strategy)
    batch.advantages[0, 0] = float("nan")
    model = make_model(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = Learner(model, LearnerConfig(lr=1e-2), strategy).update(batch)
    assert metrics["skipped_optimizer_steps"] == 1
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_lr_schedules():
    assert [lr_multiplier(s, "constant", 2, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier(6, "linear", 2, 10) == pytest.approx(0.5)
    assert lr_multiplier(6, "cosine", 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(10, "cosine", 2, 10) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="lr_schedule='step': choose one of constant, linear, cosine"):
        LearnerConfig(lr_schedule="step")


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "must be in (0, 1]"), ("lr", float("nan"), "must be in (0, 1]"), ("lr", float("inf"), "(0, 1]"),
    ("lr", 2.0, "must be in (0, 1]"),
    ("ppo_epochs", 0, ">= 1"), ("clip_ratio_low", 1.0, "[0, 1)"), ("kl_loss_type", "k4", "k1, k2, k3"),
    ("loss_agg_mode", "mean", "token_mean"), ("clip_ratio_c", 0.5, "> 1"), ("kl_coef", -1.0, ">= 0"),
])
def test_learner_config_rejects_bad_values(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        LearnerConfig(**{field: value})
    assert raised.value.key == field


def test_sft_lowers_completion_loss(tokenizer):
    model = make_model(tokenizer)
    chats = [[{"role": "user", "content": f"Sort: {a} {b}"}] for a in range(3) for b in range(3)]
    answers = [" ".join(sorted([str(a), str(b)])) for a in range(3) for b in range(3)]
    history = supervised_finetune(model, tokenizer, chats, answers, SFTConfig(steps=30, lr=3e-3, batch_size=9,
                                                                             warmup_steps=2), seed=0)
    assert history[-1]["sft_loss"] < 0.5 * history[0]["sft_loss"]
    with pytest.raises(ValueError, match="demonstrations"):
        supervised_finetune(model, tokenizer, chats, answers[:2], SFTConfig(steps=1))


def test_gradient_checkpointing_gives_the_same_gradient(tokenizer, qwen_model):
    strategy = GRPO()
    batch = _batch(qwen_model, tokenizer, strategy)
    plain, _ = _gradients(tokenizer, batch, strategy, micro_batch_size=6)
    model = make_model(tokenizer, "qwen2")
    enable_activation_checkpointing(model)
    learner = Learner(model, LearnerConfig(max_grad_norm=1e9, micro_batch_size=6), strategy)
    captured = []
    learner.optimizer.step = lambda: captured.append([p.grad.clone() for p in model.parameters()])
    learner.update(batch)
    for expected, got in zip(plain[0], captured[0]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
