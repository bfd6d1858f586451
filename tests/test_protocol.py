"""The strategy protocol, each piece shown working with a toy strategy (algorithms/base.py):
variable units per completion, hidden states for a head from the learner's own forward, strategy-owned
parameters trained and checkpointed, a prompt-order hook, a logits hook, and a model inside DDP."""

import numpy as np
import pytest
import torch

from algorithms.base import LineSegmenter, Strategy
from algorithms.grpo import GRPO
from engine.learner import Learner, LearnerConfig, PolicyBatch, Rewards
from engine.logprobs import completion_logprobs
from engine.rollout import Rollout, SamplingConfig, sample
from engine.trainer import PromptSource, Trainer, TrainerConfig
from fastdecode import KVDecoder, fast_decoder
from tests.conftest import left_padded_prompts, make_model, recompute_gaps

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


class ToyTask:
    """Eight prompts; `reward(index, text)` gives a float, or a `Rewards` when `per_line` is set."""

    def __init__(self, reward=None, per_line=False):
        self.reward, self.per_line = reward or (lambda index, text: float(len(text) % 5)), per_line

    def num_train_prompts(self):
        return 8

    def train_messages(self, index):
        return [{"role": "user", "content": f"Sort these digits: {index} 1 2"}]

    def rewards(self, prompt_indices, completions, rollout):
        if not self.per_line:
            return torch.tensor([self.reward(i, text) for i, text in zip(prompt_indices, completions)])
        lines = [text.split("\n") for text in completions]  # one reward per raw line: U differs per row
        width = max(len(row) for row in lines)
        values = torch.zeros(len(lines), width)
        mask = torch.zeros(len(lines), width, dtype=torch.bool)
        for row, row_lines in enumerate(lines):
            values[row, : len(row_lines)] = torch.tensor([float(len(line) % 3) for line in row_lines])
            mask[row, : len(row_lines)] = True
        return Rewards(values, mask)

    selection_metric = "reward"

    def evaluate(self, generate, split="test"):
        return {"reward": 0.0}


def _trainer(tokenizer, tmp_path, strategy, task=None, seed=0, **config):
    model = make_model(tokenizer, seed=seed)
    learner = Learner(model, LearnerConfig(lr=1e-2, loss_agg_mode="token_mean", micro_batch_size=4), strategy)
    trainer = Trainer(model, tokenizer, task or ToyTask(), strategy, learner,
                      TrainerConfig(**{"prompts_per_step": 2, "group_size": 4, "max_steps": 4, **config}),
                      SamplingConfig(max_new_tokens=8), tmp_path, make_decoder=fast_decoder)
    return trainer, model


# ---------------------------------------------------------------------------
# a variable number of units per completion
# ---------------------------------------------------------------------------


class LineUnits(Strategy):
    """Each line of a completion is a unit with its own reward; advantage = the line's reward minus
    the group's mean line reward (a toy version of ReRec's segments)."""

    name = "line_units"

    def __init__(self, config=None, tokenizer=None, task=None):
        super().__init__(config, tokenizer, task)
        self.segment = LineSegmenter(tokenizer)

    def unit_ids(self, rollout, rewards):
        return self.segment(rollout.completion_ids, rollout.completion_mask, max_line=rewards.values.shape[1] - 1)

    def advantages(self, rewards, rollout, unit_ids):
        values = rewards.values.masked_fill(~rewards.mask, 0.0)  # [B, U]
        group_sum = torch.zeros(int(rollout.group_ids.max()) + 1).index_add(0, rollout.group_ids, values.sum(1))
        group_count = torch.zeros_like(group_sum).index_add(0, rollout.group_ids, rewards.mask.sum(1).float())
        baseline = (group_sum / group_count)[rollout.group_ids]  # [B]
        token_values = values.gather(1, unit_ids.clamp(min=0))  # [B, T]
        return (token_values - baseline[:, None]) * (unit_ids >= 0)


def test_variable_units_per_completion(tokenizer, tmp_path, monkeypatch):
    import engine.trainer as trainer_module

    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    real_sample = trainer_module.sample

    def sample_with_newlines(*args, **kwargs):  # a random model rarely writes "\n": put some into its rows
        rollout = real_sample(*args, **kwargs)
        ids = rollout.completion_ids.clone()
        ids[:, 2::3] = torch.where(rollout.completion_mask[:, 2::3], newline, ids[:, 2::3])
        ids[1::2, 1] = torch.where(rollout.completion_mask[1::2, 1], newline, ids[1::2, 1])  # uneven line counts
        return Rollout(**{**rollout.__dict__, "completion_ids": ids})

    monkeypatch.setattr(trainer_module, "sample", sample_with_newlines)
    trainer, _ = _trainer(tokenizer, tmp_path, LineUnits(tokenizer=tokenizer), ToyTask(per_line=True))
    captured = []
    trainer.learner.update = lambda batch: captured.append(batch) or {"grad_norm": 1.0}
    trainer.train_step()
    (batch,) = captured
    texts = [tokenizer.decode(row[mask][:-1] if ended else row[mask], skip_special_tokens=False)
             for row, mask, ended in zip(batch.rollout.completion_ids, batch.rollout.completion_mask,
                                         batch.rollout.ended_with_eos)]
    line_counts = [text.count("\n") + 1 for text in texts]
    assert len(set(line_counts)) > 1  # U differs per row
    assert batch.rewards.mask.sum(1).tolist() == line_counts
    # numpy reference: per-line rewards, group baseline over all lines of the group's rows
    advantages = np.zeros(batch.advantages.shape)
    rewards = [[len(line) % 3 for line in text.split("\n")] for text in texts]
    for row in range(len(texts)):
        group = [r for r in range(len(texts)) if int(batch.rollout.group_ids[r]) == int(batch.rollout.group_ids[row])]
        baseline = np.mean([value for r in group for value in rewards[r]])
        ids = batch.rollout.completion_ids[row][batch.rollout.completion_mask[row]].tolist()
        line = 0
        for t, token in enumerate(ids):
            advantages[row, t] = rewards[row][line] - baseline
            line += tokenizer.decode([token]).count("\n") if token not in tokenizer.all_special_ids else 0
    np.testing.assert_allclose(batch.advantages.numpy(), advantages, atol=1e-6)


def test_rewards_of_different_widths_concatenate():
    first = Rewards(torch.ones(2, 3), torch.tensor([[True, True, False], [True, False, False]]))
    second = Rewards(torch.full((1, 5), 2.0), torch.ones(1, 5, dtype=torch.bool), {})
    both = Rewards.concatenate([first, second])
    assert both.values.shape == (3, 5) and both.mask.sum(1).tolist() == [2, 1, 5]
    assert both.select_rows(torch.tensor([2])).values.tolist() == [[2.0] * 5]


# ---------------------------------------------------------------------------
# hidden states for a head, and parameters the strategy owns
# ---------------------------------------------------------------------------


class HeadOnLastToken(GRPO):
    """Token credit plus a linear head on the hidden state of each row's last completion token,
    trained to predict the row's reward (a toy version of RecPO's item head)."""

    name = "head_on_last_token"
    extra_loss_name = "head_loss"

    def __init__(self, config=None, tokenizer=None, task=None, hidden_size=64):
        super().__init__(config, tokenizer, task)
        self.module = torch.nn.Linear(hidden_size, 1)
        self.seen_hidden = []

    def hidden_positions(self, batch):
        return batch.rollout.completion_mask.sum(dim=1) - 1  # [B]

    def extra_loss(self, model, batch, rows, hidden):
        self.seen_hidden.append((rows, hidden.detach().clone()))
        prediction = self.module(hidden).squeeze(1)  # [b]
        return ((prediction - batch.rewards.values[rows, 0]) ** 2).sum()


def _policy_batch(tokenizer, model, strategy, rewards=None):
    ids, mask = left_padded_prompts(tokenizer, ["Sort these digits: 3 1 2", "Fargo"])
    rollout = sample(model, ids, mask, 3, SamplingConfig(max_new_tokens=6), [tokenizer.eos_token_id],
                     tokenizer.pad_token_id, torch.Generator().manual_seed(0), make_decoder=fast_decoder)
    rewards = Rewards.from_tensor(torch.arange(rollout.num_rows, dtype=torch.float32) if rewards is None else rewards)
    unit_ids = strategy.unit_ids(rollout, rewards)
    return PolicyBatch(rollout, rewards, unit_ids, strategy.advantages(rewards, rollout, unit_ids))


def test_hidden_states_come_from_the_same_forward_and_train_the_strategys_head(tokenizer):
    model = make_model(tokenizer, seed=4)
    strategy = HeadOnLastToken()
    batch = _policy_batch(tokenizer, model, strategy)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    learner = Learner(model, LearnerConfig(lr=1e-2, micro_batch_size=4), strategy)
    head_before = [p.detach().clone() for p in strategy.module.parameters()]
    reference = {}
    with torch.no_grad():  # the expected hidden states, from a separate plain forward of each row
        for row in range(batch.rollout.num_rows):
            length = int(batch.rollout.completion_mask[row].sum())
            ids = torch.cat([batch.rollout.prompt_ids[row][batch.rollout.prompt_mask[row]],
                             batch.rollout.completion_ids[row, :length]])
            reference[row] = model.model(input_ids=ids[None]).last_hidden_state[0, -1]
    metrics = learner.update(batch)
    assert len(forwards) == 2  # 6 rows in micro-batches of 4: one forward each, no second pass for the head
    for rows, hidden in strategy.seen_hidden:
        for index, row in enumerate(rows.tolist()):
            torch.testing.assert_close(hidden[index], reference[row], atol=1e-5, rtol=1e-5)
    assert metrics["head_loss"] > 0
    assert all(not torch.equal(b, p) for b, p in zip(head_before, strategy.module.parameters()))  # in the optimizer


def test_strategy_parameters_are_checkpointed_and_resume_exactly(tokenizer, tmp_path):
    def run(directory, steps, resume_from=None):
        torch.manual_seed(0)  # as experiments.run's seed_everything: the head starts the same in every run
        strategy = HeadOnLastToken()
        trainer, model = _trainer(tokenizer, directory, strategy, max_steps=steps)
        if resume_from is not None:
            assert trainer.resume(resume_from) == 2
        while trainer.step < steps:
            trainer.train_step()
            trainer.step += 1
        trainer.save()
        return model, strategy

    straight_model, straight_strategy = run(tmp_path / "straight", 4)
    run(tmp_path / "first", 2)
    resumed_model, resumed_strategy = run(tmp_path / "first", 4, resume_from=tmp_path / "first")
    for a, b in zip(straight_strategy.module.parameters(), resumed_strategy.module.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# the prompt-order hook
# ---------------------------------------------------------------------------


class Curriculum(GRPO):
    """From epoch 1 on: drop prompt 0 and order the rest by how often they were sampled (a toy curriculum)."""

    name = "curriculum"

    def __init__(self, config=None, tokenizer=None, task=None):
        super().__init__(config, tokenizer, task)
        self.times_seen: dict[int, int] = {}

    def shape_rewards(self, rewards, rollout):
        for index in rollout.prompt_indices.unique().tolist():
            self.times_seen[index] = self.times_seen.get(index, 0) + 1
        return rewards

    def order_prompts(self, epoch, order):
        if epoch == 0:
            return order
        return sorted((i for i in order if i != 0), key=lambda i: (self.times_seen.get(i, 0), i))

    def state_dict(self):
        return {"times_seen": dict(self.times_seen)}

    def load_state_dict(self, state):
        self.times_seen = dict(state["times_seen"])


def test_prompt_order_hook_reorders_and_drops():
    seen = {0: 5, 3: 1}
    source = PromptSource(4, seed=0, order_prompts=lambda epoch, order: order if epoch == 0 else
                          sorted((i for i in order if i != 0), key=lambda i: (seen.get(i, 0), i)))
    first_epoch = source.take(4)
    assert sorted(first_epoch) == [0, 1, 2, 3]
    assert source.take(3) == [1, 2, 3]  # epoch 1: prompt 0 dropped, the rest by count then index
    assert source.epoch == 1 and source.consumed == 7
    with pytest.raises(RuntimeError, match="every prompt was dropped"):
        PromptSource(2, 0, order_prompts=lambda epoch, order: []).take(1)


def test_prompt_order_state_is_checkpointed(tokenizer, tmp_path):
    def prompts_taken(directory, steps, resume_from=None):
        strategy = Curriculum()
        trainer, _ = _trainer(tokenizer, directory, strategy, max_steps=steps)
        if resume_from is not None:
            trainer.resume(resume_from)
        taken = []
        original = trainer.prompts.take
        trainer.prompts.take = lambda count: taken.extend(original(count)) or taken[-count:]
        while trainer.step < steps:
            trainer.train_step()
            trainer.step += 1
        trainer.save()
        return taken, strategy

    straight, straight_strategy = prompts_taken(tmp_path / "a", 7)  # 14 prompts: two epochs of 8, then more
    assert 0 not in straight[8:]  # dropped after the first epoch
    first, _ = prompts_taken(tmp_path / "b", 5)
    rest, resumed_strategy = prompts_taken(tmp_path / "b", 7, resume_from=tmp_path / "b")
    assert first + rest == straight
    assert resumed_strategy.times_seen == straight_strategy.times_seen


# ---------------------------------------------------------------------------
# the logits hook (constrained decoding)
# ---------------------------------------------------------------------------


def allowed_tokens_hook(vocab_size):
    """Token v is allowed at completion position t of prompt p iff (v + t + p) % 3 == 0, or it is v = 2."""

    def hook(logits, prompt_indices, completion_ids, start):  # logits [N, C, V]
        positions = start + torch.arange(logits.shape[1])  # [C]
        vocabulary = torch.arange(vocab_size)  # [V]
        allowed = (vocabulary[None, None, :] + positions[None, :, None] + prompt_indices[:, None, None]) % 3 == 0
        allowed |= vocabulary[None, None, :] == 2
        return logits.masked_fill(~allowed, float("-inf"))

    return hook


@pytest.mark.parametrize("decoder", ["fast", "plain"])
def test_logits_hook_constrains_sampling_and_the_recompute_matches(tokenizer, decoder):
    from engine.rollout import transformers_decoder

    model = make_model(tokenizer, seed=2)
    hook = allowed_tokens_hook(len(tokenizer))
    ids, mask = left_padded_prompts(tokenizer, ["Sort these digits: 3 1 2", "Fargo", "Recommend movies"])
    rollout = sample(model, ids, mask, 4, SamplingConfig(max_new_tokens=10), [2], tokenizer.pad_token_id,
                     torch.Generator().manual_seed(1), logits_hook=hook, prompt_indices=torch.tensor([5, 6, 7]),
                     make_decoder=fast_decoder if decoder == "fast" else transformers_decoder)
    for row in range(rollout.num_rows):
        prompt = int(rollout.prompt_indices[row])
        for t in range(int(rollout.completion_lengths[row])):
            token = int(rollout.completion_ids[row, t])
            assert token == 2 or (token + t + prompt) % 3 == 0
    assert recompute_gaps(model, rollout, chunk_size=3, logits_hook=hook)[0] < 1e-5
    with torch.no_grad():
        unconstrained = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                            rollout.completion_mask).logprobs
    assert float((unconstrained - rollout.old_logprobs).abs()[rollout.completion_mask].max()) > 0.1


# ---------------------------------------------------------------------------
# a model inside DistributedDataParallel
# ---------------------------------------------------------------------------


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_model_uses_the_fast_decoder_and_learns_like_the_plain_model(tokenizer, process_group):
    plain, wrapped_inner = make_model(tokenizer, seed=5), make_model(tokenizer, seed=5)
    wrapped = torch.nn.parallel.DistributedDataParallel(wrapped_inner)
    assert isinstance(fast_decoder(wrapped, 4, 32, SamplingConfig()), KVDecoder)
    strategy = GRPO()
    batch = _policy_batch(tokenizer, plain, strategy)
    wrapped_rollout = _policy_batch(tokenizer, wrapped, strategy).rollout
    assert torch.equal(wrapped_rollout.completion_ids, batch.rollout.completion_ids)
    for model in (plain, wrapped):
        Learner(model, LearnerConfig(lr=1e-2, micro_batch_size=4), strategy).update(batch)
    for a, b in zip(plain.parameters(), wrapped_inner.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), make_model(tokenizer, seed=5).parameters()))
