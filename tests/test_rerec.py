"""ReRec end to end on hand-made inputs: the task's rewards (S_QAS, S_PAS, both forms, RAAE flags, bad input),
the strategy's segments, advantages, loss and gradient against numpy written here, the curriculum's order,
drops and checkpointed state, and the warm start's leakage rules (docs/rerec.md)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.grpo import GRPO
from algorithms.rerec import ReRec, ReRecConfig, curriculum_order
from engine.config import ConfigError
from engine.learner import Rewards
from engine.loss import LossConfig, policy_loss
from engine.rollout import Rollout
from engine.trainer import PromptSource
from experiments.data.item_graph import build_item_graph
from experiments.data.movielens import Movie, MovieLensRatings, build_conversations
from experiments.data.next_item import next_item_requests
from experiments.rerec_task import (
    ChoiceRequest,
    ReRecTask,
    ReRecTaskConfig,
    build_requests,
    collaborative_item_embeddings,
    demonstration_text,
    split_rl_and_sft,
)
from experiments.statistics import interval_dict

# ----------------------------------------------------------------------------- a toy graph and toy factors

MOVIES = {
    1: Movie(1, "Forrest Gump", 1994, "Forrest Gump (1994)", ("Drama", "Romance")),
    2: Movie(2, "The Terminal", 2004, "Terminal, The (2004)", ("Comedy", "Drama")),
    3: Movie(3, "Cast Away", 2000, "Cast Away (2000)", ("Drama",)),
    4: Movie(4, "Psycho", 1960, "Psycho (1960)", ("Horror", "Thriller")),
    5: Movie(5, "Amélie", 2001, "Amélie (2001)", ("Comedy", "Romance")),
}
LINKS = {1: "m.gump", 2: "m.terminal", 3: "m.castaway"}
TRIPLES = [("m.gump", "film.film.actor", "m.hanks"), ("m.gump", "film.film.directed_by", "m.zemeckis"),
           ("m.terminal", "film.film.actor", "m.hanks"), ("m.terminal", "film.film.directed_by", "m.spielberg"),
           ("m.castaway", "film.film.actor", "m.hanks"), ("m.castaway", "film.film.directed_by", "m.zemeckis")]
# Item embeddings, row = item id (row 0 unused; item 5 has no interactions: a zero row).
FACTORS = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 2], [0, 3, 4], [0, 0, 0]], dtype=np.float32)
NAMES = ("Forrest Gump (1994)", "The Terminal (2004)", "Cast Away (2000)", "Psycho (1960)", "Amélie (2001)")
GUMP, TERMINAL, CAST_AWAY, PSYCHO, AMELIE = range(5)


def toy_task(**settings) -> ReRecTask:
    graph = build_item_graph(MOVIES, LINKS, TRIPLES, "toy")
    request = ChoiceRequest(user_id=7, split="train", cutoff=3, history_item_ids=(3,), shown_item_ids=(3,),
                            candidate_item_ids=(1, 2, 3, 4, 5), candidate_names=NAMES, target_index=GUMP,
                            prompt="Which one?")
    config = ReRecTaskConfig(num_candidates=5, **settings)
    return ReRecTask(config, graph, FACTORS, [request], [request], [request], [request])


# Target Forrest Gump: attributes {Drama, Romance, actor hanks, director zemeckis} (4).
QAS_TERMINAL = 2 / 4  # shares Drama, actor hanks
QAS_CAST_AWAY = 3 / 4  # shares Drama, actor hanks, director zemeckis
PAS_TERMINAL = 1 / math.sqrt(2)  # cos([1,0,0], [1,1,0])
PAS_CAST_AWAY = 0.0  # cos([1,0,0], [0,0,2])

WRONG_NAMED = "I like Drama.\nThe Terminal (2004) is Comedy, Drama.\n\\boxed{The Terminal (2004)}"
WRONG_UNNAMED = "I like Drama.\nIt is a comedy.\n\\boxed{The Terminal (2004)}"
YEAR_STRIPPED = "The Terminal is fun.\nthe terminal (2004) too\n\\boxed{The Terminal}"
CORRECT = "Forrest Gump (1994) is Drama.\n\\boxed{Forrest Gump (1994)}"
NO_BOX = "The Terminal (2004) is Comedy."
SEVERAL_BOXES = "\\boxed{The Terminal (2004)}\nThe Terminal (2004) again\n\\boxed{Forrest Gump (1994)}"


def test_query_and_preference_alignment_on_the_toy_graph():
    task = toy_task()
    terminal, cast_away = task.score(task.rl_requests[0], WRONG_NAMED), task.score(task.rl_requests[0],
                                                                                     "\\boxed{Cast Away (2000)}")
    assert terminal.query_alignment == pytest.approx(QAS_TERMINAL)
    assert terminal.preference_alignment == pytest.approx(PAS_TERMINAL)
    assert cast_away.query_alignment == pytest.approx(QAS_CAST_AWAY)
    assert cast_away.preference_alignment == pytest.approx(PAS_CAST_AWAY)
    amelie = task.score(task.rl_requests[0], "\\boxed{Amélie (2001)}")  # no interactions: S_PAS 0
    assert amelie.preference_alignment == 0.0 and amelie.query_alignment == pytest.approx(1 / 4)  # Romance


def test_both_reward_forms():
    paper, code = toy_task(), toy_task(reward_form="code")
    request = paper.rl_requests[0]
    expected_wrong = 0.01 * QAS_TERMINAL + 0.01 * PAS_TERMINAL
    assert paper.score(request, WRONG_NAMED).reward == pytest.approx(expected_wrong)
    assert code.score(request, WRONG_NAMED).reward == pytest.approx(0.05 + expected_wrong)
    assert paper.score(request, CORRECT).reward == pytest.approx(1.02)  # S_QAS = S_PAS = 1 for the target
    assert code.score(request, CORRECT).reward == pytest.approx(1.07)
    assert paper.score(request, NO_BOX).reward == 0.0 and code.score(request, NO_BOX).reward == pytest.approx(-0.55)
    weighted = toy_task(query_weight=0.5, preference_weight=0.0)
    assert weighted.score(request, WRONG_NAMED).reward == pytest.approx(0.5 * QAS_TERMINAL)
    with pytest.raises(ConfigError, match="query_weight"):
        ReRecTaskConfig(reward_form="code", query_weight=0.5)


@pytest.mark.parametrize("completion, flags, hit", [
    (WRONG_NAMED, [False, True, False], 0.0),  # the line naming the wrong item; the boxed line exempt
    (WRONG_UNNAMED, [False, False, False], 0.0),  # wrong, but never named in the reasoning
    (YEAR_STRIPPED, [True, True, False], 0.0),  # "The Terminal" without its year, and in lower case
    (CORRECT, [False, False], 1.0),  # a right answer is never penalised
    (NO_BOX, [False], 0.0),  # no box: no answer, nothing penalised
    (SEVERAL_BOXES, [False, True, False], 0.0),  # the first box answers; every box line is exempt
])
def test_raae_flags_per_line(completion, flags, hit):
    task = toy_task()
    rewards = task.rewards([0], [completion])
    assert rewards.extras["penalised"][0].tolist() == [float(flag) for flag in flags]
    assert rewards.extras["ndcg_at_1"].tolist() == [hit]
    assert rewards.mask[0].tolist() == [True] * len(flags)
    assert rewards.values.shape == (1, len(flags))


def test_bad_completions_get_documented_rewards():
    paper, code = toy_task(), toy_task(reward_form="code")
    completions = ["", "\n" * 9_999, "🎬 Amélie (2001) ✓\n\\boxed{AMÉLIE (2001)}", "\\boxed{\u0000{}garbage}}",
                   "\\boxed{}"]
    rewards = paper.rewards([0] * len(completions), completions)
    assert rewards.values.shape == (5, 10_000)
    # empty and blank: no box (0); Unicode: case-folded match to Amélie, a wrong candidate; garbage / empty box: 0
    amelie = 0.01 * (1 / 4)  # S_QAS 1/4, S_PAS 0
    np.testing.assert_allclose(rewards.values[:, 0].numpy(), [0, 0, amelie, 0, 0], atol=1e-7)
    assert not rewards.mask[0].any() and not rewards.mask[1].any()  # blank lines are no segments
    assert rewards.extras["penalised"][2, :2].tolist() == [1.0, 0.0]  # the Unicode line names the wrong answer
    np.testing.assert_allclose(code.rewards([0] * 5, completions).values[:, 0].numpy(),
                               [-0.55, -0.55, 0.05 + amelie, 0.05, 0.05], atol=1e-6)
    with pytest.raises(TypeError, match="str"):
        paper.rewards([0], [None])
    sequence = toy_task(reward_unit="sequence").rewards([0, 0], [CORRECT, NO_BOX])
    assert sequence.values.shape == (2, 1) and set(sequence.extras) == {"ndcg_at_1"}


def test_evaluation_metrics():
    task = toy_task()
    metrics = task.evaluate(lambda chats, **_: [CORRECT] * len(chats))
    assert metrics["hit@1"] == 1.0 and metrics["well_formed_frac"] == 1.0 and metrics["in_candidates_frac"] == 1.0
    assert metrics["reasoning_lines"] == 1.0 and metrics["reasoning_words"] == 5.0
    metrics = task.evaluate(lambda chats, **_: ["\\boxed{Jaws (1975)}"] * len(chats), split="val")
    assert metrics["hit@1"] == 0.0 and metrics["well_formed_frac"] == 1.0 and metrics["in_candidates_frac"] == 0.0


def test_collaborative_embeddings_are_the_scaled_right_singular_vectors():
    rng = np.random.default_rng(0)
    interactions = (rng.random((12, 9)) < 0.4).astype(np.float32)
    interactions[:, 4] = 0.0  # an item nobody rated
    _, singular, right = np.linalg.svd(interactions.astype(np.float64), full_matrices=False)
    expected = right[:3].T * singular[:3]  # [items, 3]
    found = collaborative_item_embeddings(interactions, 3)
    np.testing.assert_allclose(np.abs(found), np.abs(expected), atol=1e-5)  # each column up to its sign
    rated = [item for item in range(9) if item != 4]

    def cosine(vectors):
        vectors = vectors[rated]
        return vectors @ vectors.T / (np.linalg.norm(vectors, axis=1)[:, None] * np.linalg.norm(vectors, axis=1))

    np.testing.assert_allclose(cosine(found), cosine(expected), atol=1e-5)
    assert not found[4].any()  # X^T U_k of a zero column


def test_paired_bootstrap_against_numpy():
    first = np.array([1, 0, 1, 1, 0, 1, 0, 1], dtype=float)
    second = np.array([0, 0, 1, 0, 0, 1, 1, 0], dtype=float)
    result = interval_dict(first, second, resamples=2000, seed=3)
    rng = np.random.default_rng(3)
    difference = first - second
    means = np.concatenate([difference[rng.integers(0, 8, size=(1000, 8))].mean(axis=1) for _ in range(2)])
    assert result["difference"] == pytest.approx(0.25)  # differences 1,0,0,1,0,0,-1,1
    assert result["low"] == pytest.approx(np.quantile(means, 0.025))
    assert result["high"] == pytest.approx(np.quantile(means, 0.975))
    with pytest.raises(ValueError, match="paired"):
        interval_dict(first, second[:3])


# ----------------------------------------------------------------------------- the strategy


def _rollout(rows, group_ids, prompt_indices=None, pad_id=0):
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_id] * (length - len(row)) for row in rows])
    mask = torch.tensor([[True] * len(row) + [False] * (length - len(row)) for row in rows])
    batch = len(rows)
    return Rollout(prompt_ids=torch.zeros(batch, 1, dtype=torch.long), prompt_mask=torch.ones(batch, 1, dtype=torch.bool),
                   completion_ids=ids, completion_mask=mask, old_logprobs=torch.zeros(batch, length),
                   group_ids=torch.tensor(group_ids),
                   prompt_indices=torch.tensor(group_ids if prompt_indices is None else prompt_indices),
                   ended_with_eos=torch.ones(batch, dtype=torch.bool), temperature=1.0)


def _reference_advantages(tokenizer, rows, group_ids, rewards, penalised, statistics, weight=0.3, eps=1e-4):
    """numpy: line of token t = newlines in the decoded tokens before t; segment reward; group normalisation."""
    line_of = [[tokenizer.decode(row[:t], skip_special_tokens=True, clean_up_tokenization_spaces=False).count("\n")
                for t in range(len(row))] for row in rows]
    token_rewards = [[rewards[b] - weight * abs(rewards[b]) if penalised[b][line] else rewards[b]
                      for line in line_of[b]] for b in range(len(rows))]
    advantages = np.zeros((len(rows), max(len(row) for row in rows)))
    for group in set(group_ids):
        members = [b for b in range(len(rows)) if group_ids[b] == group]
        sequence = np.array([rewards[b] for b in members])
        pool = sequence if statistics == "sequence" else np.concatenate([token_rewards[b] for b in members])
        mean, std = pool.mean(), pool.std(ddof=1)
        for b in members:
            values = (np.array(token_rewards[b]) - mean) / (std + eps)
            if statistics == "sequence" and sequence.max() == sequence.min():
                values = np.zeros_like(values)
            advantages[b, :len(rows[b])] = values
    return advantages


def test_worked_advantage_example(tokenizer):
    """docs/rerec.md: G = 5, rewards [1.05, 0.05, 0.05, 1.05, 0.05]; a penalised line (0.035) gets -0.7577."""
    strategy = ReRec(ReRecConfig(advantage_eps=1e-12), tokenizer=tokenizer)
    rewards = Rewards(torch.tensor([1.05, 0.05, 0.05, 1.05, 0.05])[:, None].expand(5, 2).contiguous(),
                      torch.ones(5, 2, dtype=torch.bool),
                      {"penalised": torch.tensor([[0.0, 0], [0, 1], [0, 0], [0, 0], [0, 0]]), "ndcg_at_1": torch.zeros(5)})
    rollout = _rollout([[5, 5]] * 5, [0] * 5)
    unit_ids = torch.tensor([[0, 1]] * 5)
    advantages = strategy.advantages(rewards, rollout, unit_ids)
    np.testing.assert_allclose(advantages[:, 0].numpy(), [1.0954, -0.7303, -0.7303, 1.0954, -0.7303], atol=1e-4)
    assert advantages[1, 1].item() == pytest.approx(-0.7577, abs=1e-4)


@pytest.mark.parametrize("statistics", ["sequence", "token"])
def test_segments_advantages_loss_and_gradient_against_numpy(tokenizer, statistics):
    task = toy_task()
    completions = [WRONG_NAMED, CORRECT, YEAR_STRIPPED, WRONG_UNNAMED, SEVERAL_BOXES, "I like\n\nDrama.\n\\boxed{Psycho (1960)}",
                   NO_BOX, "\\boxed{Amélie (2001)}"]
    group_ids = [0, 0, 0, 0, 1, 1, 1, 1]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in completions]
    rewards = task.rewards([0] * 8, completions)
    rollout = _rollout(rows, group_ids, pad_id=tokenizer.pad_token_id)
    strategy = ReRec(ReRecConfig(statistics=statistics), tokenizer=tokenizer)
    unit_ids = strategy.unit_ids(rollout, rewards)
    for b, row in enumerate(rows):  # the segment of token t: newlines in the text before it
        expected = [tokenizer.decode(row[:t], skip_special_tokens=True).count("\n") for t in range(len(row))]
        assert unit_ids[b, :len(row)].tolist() == expected and (unit_ids[b, len(row):] == -1).all()
    advantages = strategy.advantages(rewards, rollout, unit_ids)
    sequence_rewards = [task.score(task.rl_requests[0], text).reward for text in completions]
    penalised = [task.score(task.rl_requests[0], text).penalised for text in completions]
    expected = _reference_advantages(tokenizer, rows, group_ids, sequence_rewards, penalised, statistics)
    np.testing.assert_allclose(advantages.numpy(), expected, atol=1e-5)

    # The loss of policy_loss with these advantages, and its gradient, against numpy.
    generator = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(rollout.completion_ids.shape, generator=generator) * 3).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(logprobs.shape, generator=generator)
    mask = rollout.completion_mask
    config = LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.2, loss_agg_mode="token_mean")
    loss, _ = policy_loss(logprobs, old, advantages, mask, config, unit_ids=unit_ids, ratio_level=strategy.ratio_level)
    loss.backward()
    ratio = np.exp(logprobs.detach().numpy() - old.numpy())
    clipped = np.clip(ratio, 0.8, 1.2)
    m = mask.numpy()
    reference_loss = (np.maximum(-ratio * expected, -clipped * expected) * m).sum() / m.sum()
    unclipped_active = -ratio * expected >= -clipped * expected  # the max picks the unclipped term
    reference_grad = np.where(unclipped_active, -ratio * expected, 0.0) * m / m.sum()
    assert loss.item() == pytest.approx(reference_loss, rel=1e-5)
    np.testing.assert_allclose(logprobs.grad.numpy(), reference_grad, atol=1e-6)


def test_raae_equals_grpo_with_a_zero_one_reward(tokenizer):
    """Without graph terms a wrong answer scores 0 and (1 - w) 0 = 0: RAAE's advantages are GRPO's."""
    task = toy_task(query_weight=0.0, preference_weight=0.0)
    completions = [WRONG_NAMED, CORRECT, YEAR_STRIPPED, WRONG_UNNAMED]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in completions]
    rollout = _rollout(rows, [0, 0, 0, 0], pad_id=tokenizer.pad_token_id)
    rewards = task.rewards([0] * 4, completions)
    strategy = ReRec(tokenizer=tokenizer)
    raae = strategy.advantages(rewards, rollout, strategy.unit_ids(rollout, rewards))
    grpo = GRPO().advantages(Rewards.from_tensor(rewards.values[:, 0]), rollout, None)
    torch.testing.assert_close(raae, grpo)


def test_no_spread_means_no_advantage_in_the_sequence_reading(tokenizer):
    """All G answers the same wrong item: sigma = 0, so A = 0 (not -w|r|/eps); the token reading stays bounded."""
    task = toy_task()
    rows = [tokenizer(WRONG_NAMED, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]] * 3
    rollout = _rollout(rows, [0, 0, 0], pad_id=tokenizer.pad_token_id)
    rewards = task.rewards([0] * 3, [WRONG_NAMED] * 3)
    sequence = ReRec(tokenizer=tokenizer)
    assert not sequence.advantages(rewards, rollout, sequence.unit_ids(rollout, rewards)).any()
    token = ReRec(ReRecConfig(statistics="token"), tokenizer=tokenizer)
    advantages = token.advantages(rewards, rollout, token.unit_ids(rollout, rewards))
    assert advantages.min() < 0 < advantages.max() and advantages.abs().max() < 10


def test_bad_strategy_inputs(tokenizer):
    with pytest.raises(ConfigError, match="penalty_weight"):
        ReRecConfig(penalty_weight=1.5)
    with pytest.raises(ConfigError, match="statistics"):
        ReRecConfig(statistics="tokens")
    with pytest.raises(ConfigError, match="advantage_scale"):
        ReRecConfig(advantage_scale="none")
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"curriculum_threshold=.*must be in \[0, 1\]"):
            ReRecConfig(curriculum_threshold=threshold)
    strategy = ReRec(tokenizer=tokenizer)
    rewards = Rewards.from_tensor(torch.tensor([1.0, 0.0]))
    rollout = _rollout([[5], [5]], [0, 0])
    with pytest.raises(ValueError, match="reward_unit=line"):
        strategy.advantages(rewards, rollout, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ndcg_at_1"):
        strategy.shape_rewards(rewards, rollout)


# ----------------------------------------------------------------------------- the curriculum


def _record(strategy, prompts_and_hits):
    """Feed one step's rollouts: [(prompt index, [NDCG@1 of its G samples])]."""
    prompt_indices = [prompt for prompt, hits in prompts_and_hits for _ in hits]
    hits = torch.tensor([hit for _, row in prompts_and_hits for hit in row], dtype=torch.float32)
    rewards = Rewards(hits[:, None], torch.ones(len(hits), 1, dtype=torch.bool), {"ndcg_at_1": hits})
    strategy.shape_rewards(rewards, _rollout([[5]] * len(hits), prompt_indices))


def test_curriculum_order_oracle():
    """docs/rerec.md: G = 5, tau = 0.1: d 0 dropped, 0.2 and 1.0 kept, easy first."""
    difficulties = {"mastered": 0.0, "hard": 1.0, "medium": 0.2}
    assert curriculum_order(difficulties, ["mastered", "hard", "medium"], tau=0.1) == ["medium", "hard"]
    previous = ["a", "b", "c", "d", "e", "f"]
    difficulties = {"a": 0.8, "b": None, "c": 0.05, "d": 0.3, "f": 0.3}  # e never rolled out
    # survivors a b d e f (c dropped); b and e stay 2nd and 4th; a d f slots get d f a (0.3, 0.3 stable, 0.8)
    assert curriculum_order(difficulties, previous, tau=0.1) == ["d", "b", "f", "e", "a"]
    assert curriculum_order({"a": 0.5, "b": None, "c": 0.0, "e": 0.2}, ["a", "b", "c", "e"], 0.1) == ["e", "b", "a"]


def test_curriculum_order_edges():
    assert curriculum_order({}, [], 0.1) == []
    assert curriculum_order({"a": 0.0, "b": 0.09}, ["a", "b"], 0.1) == []  # all mastered
    assert curriculum_order({"a": 0.1}, ["a"], tau=0.1) == ["a"]  # d = tau is kept
    assert curriculum_order({1: 0.5, 2: 0.2}, [1, 2], tau=0.0) == [2, 1]  # any hashable prompt
    with pytest.raises(ValueError, match="twice"):
        curriculum_order({}, ["a", "a"], 0.1)
    with pytest.raises(ValueError, match="not in previous_order"):
        curriculum_order({"z": 0.5}, ["a"], 0.1)
    with pytest.raises(ValueError, match="finite"):
        curriculum_order({"a": float("nan")}, ["a"], 0.1)
    with pytest.raises(ValueError, match="finite"):
        curriculum_order({"a": 0.5}, ["a"], float("inf"))


def test_curriculum_orders_and_drops(tokenizer):
    strategy = ReRec(tokenizer=tokenizer)
    assert strategy.order_prompts(0, [3, 1, 0, 2, 4]) == [3, 1, 0, 2, 4]  # nothing seen yet
    # the worked example: [1,1,1,1,1] -> d 0 dropped; [1,1,1,1,0] -> 0.2; [0,0,0,0,0] -> 1.0
    _record(strategy, [(3, [1, 1, 1, 1, 1]), (1, [0, 0, 0, 0, 0]), (0, [1, 1, 1, 1, 0]), (2, [1, 0, 1, 0, 1])])
    assert strategy.difficulty == pytest.approx({3: 0.0, 1: 1.0, 0: 0.2, 2: 0.4})
    # epoch 1 from the permutation [4, 3, 2, 1, 0]: 4 unseen keeps slot 0; 0.2, 0.4, 1.0 fill the rest
    assert strategy.order_prompts(1, [4, 3, 2, 1, 0]) == [4, 0, 2, 1]
    assert strategy.dropped == {3}
    _record(strategy, [(0, [1, 1, 1, 1, 1])])  # mastered now: dropped at the next epoch, 3 stays out
    assert strategy.order_prompts(2, [0, 1, 2, 3, 4]) == [2, 1, 4]
    # If every remaining prompt is mastered, nothing is dropped.
    _record(strategy, [(prompt, [1, 1, 1, 1, 1]) for prompt in (1, 2, 4)])
    assert strategy.order_prompts(3, [4, 1, 2]) == [4, 1, 2]
    off = ReRec(ReRecConfig(curriculum=False), tokenizer=tokenizer)
    _record(off, [(0, [1, 1, 1, 1, 1])])
    assert off.order_prompts(1, [0, 1]) == [0, 1] and off.difficulty == {}


def test_curriculum_state_resumes_exactly(tokenizer):
    """A run saved mid-way and resumed draws the same prompts as the uninterrupted run."""
    hits_of = {prompt: [float((prompt * 7 + k) % 3 == 0) for k in range(5)] for prompt in range(6)}

    def run(steps, strategy, source):
        taken = []
        for _ in range(steps):
            prompts = source.take(2)
            taken += prompts
            _record(strategy, [(prompt, [1.0] * 5 if prompt == 1 else hits_of[prompt]) for prompt in prompts])
        return taken

    straight_strategy = ReRec(tokenizer=tokenizer)
    straight = run(9, straight_strategy, PromptSource(6, seed=0, order_prompts=straight_strategy.order_prompts))
    assert 1 in straight[:6] and 1 not in straight[6:]  # mastered in epoch 0, dropped afterwards
    first_strategy = ReRec(tokenizer=tokenizer)
    first_source = PromptSource(6, seed=0, order_prompts=first_strategy.order_prompts)
    first = run(4, first_strategy, first_source)
    resumed_strategy = ReRec(tokenizer=tokenizer)
    resumed_strategy.load_state_dict(torch.load(_saved(first_strategy.state_dict()), weights_only=False))
    resumed_source = PromptSource(6, seed=0, order_prompts=resumed_strategy.order_prompts)
    resumed_source.load_state_dict(first_source.state_dict())
    assert first + run(5, resumed_strategy, resumed_source) == straight
    assert resumed_strategy.state_dict() == straight_strategy.state_dict()


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ----------------------------------------------------------------------------- requests and the warm start


def _timelines_fixture(test_items=(18, 19, 20)):
    """Two users of 20 ratings over items 1..30 (time order = list order); the last three ratings of user 1
    (her validation and test part) are `test_items`, so changing them must not change any training data."""
    genres = ("Drama", "Comedy", "Horror")
    movies = {i: Movie(i, f"Movie {i}", 1990 + i, f"Movie {i} ({1990 + i})", (genres[i % 3],)) for i in range(1, 31)}
    user_1 = list(range(1, 18)) + list(test_items)
    user_2 = list(range(30, 10, -1))
    users, items = [1] * 20 + [2] * 20, user_1 + user_2
    ratings = [5 if k % 3 else 3 for k in range(20)] * 2
    table = MovieLensRatings(np.array(users), np.array(items), np.array(ratings, dtype=np.float32),
                             np.array(list(range(20)) * 2), movies, {}, None, "recbole")
    return build_conversations(table, train_cuts_per_user=0), build_item_graph(movies, None, None, "genres")


def _training_data(test_items):
    conversations, graph = _timelines_fixture(test_items)
    config = ReRecTaskConfig(num_candidates=5, rl_prompts=1, train_prefixes_per_user=4)
    train = build_requests(conversations, graph, next_item_requests(conversations, "train", 4), config)
    rl, sft = split_rl_and_sft(train, config.rl_prompts, config.candidate_seed)
    embeddings = collaborative_item_embeddings(conversations.interaction_matrix("train"), 8)
    return conversations, train, rl, sft, [demonstration_text(request, graph) for request in sft], embeddings


def test_warm_start_never_reads_validation_or_test_items():
    conversations, train, rl, sft, demonstrations, embeddings = _training_data((18, 19, 20))
    changed = _training_data((25, 26, 27))
    assert (train, rl, sft, demonstrations) == changed[1:5]
    np.testing.assert_array_equal(embeddings, changed[5])
    train_parts = {t.user_id: set(t.item_ids[:t.train_end]) for t in conversations.timelines}
    for request in train:
        assert set(request.history_item_ids) | {request.target_item_id} <= train_parts[request.user_id]
        assert len(set(request.candidate_item_ids)) == 5
        negatives = set(request.candidate_item_ids) - {request.target_item_id}
        assert not negatives & train_parts[request.user_id]  # negatives: items the user has not rated
    assert len(rl) == 1 and rl[0] not in sft
    assert all((r.user_id, r.target_item_id) != (rl[0].user_id, rl[0].target_item_id) for r in sft)
    for request, text in zip(sft, demonstrations):
        lines = text.split("\n")
        assert len(lines) == 4 and lines[-1] == f"\\boxed{{{request.candidate_names[request.target_index]}}}"
        named = {int(word) for word in text.replace("(", " ").split() if word.isdigit() and int(word) < 100}
        assert named <= train_parts[request.user_id]  # "Movie <id>" names only train-part items


# ----------------------------------------------------------------------------- end to end on ML-100K

SHARED_DATA = Path(os.environ.get("RECRL_DATA_DIR") or "/nonexistent-recrl-data")
needs_movielens = pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.kg").is_file(),
                                     reason="ML-100K with its knowledge graph not found under $RECRL_DATA_DIR")


@pytest.mark.slow
@needs_movielens
def test_rerec_ml100k_quick_end_to_end_and_the_table(tmp_path, monkeypatch):
    from experiments import rerec_task, run

    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert run.main(["rerec_ml100k", "--quick", "--out", str(out)]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    for stage in ("sft", "rerec", "rerec/last"):
        for key in ("hit@1", "well_formed_frac", "in_candidates_frac"):
            assert 0.0 <= evaluation[stage][key] <= 1.0
        assert evaluation[stage]["reasoning_lines"] >= 0.0
    assert set(evaluation) == {"sft", "rerec", "rerec/last"}  # eval.json holds {stage: test metrics} only
    selection = json.loads((out / "selection.json").read_text())
    assert selection["metric"] == "hit@1" and selection["split"] == "val"
    assert [step for step, _ in selection["history"]] == [0, 3, 6]  # eval_every 3 in --quick
    assert selection["best_value"] == max(value for _, value in selection["history"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("epoch", 0) for row in rows) >= 2  # 6 steps x 4 prompts over 8 RL prompts: the curriculum acts
    state = torch.load(out / "checkpoints" / "step_6" / "components.pt", weights_only=False)["strategy"]
    assert set(state["difficulty"]) == set(range(8)) and all(0.0 <= d <= 1.0 for d in state["difficulty"].values())

    sft_folder = json.loads((out / "config.json").read_text())["initial_model"]
    table = tmp_path / "table.json"
    assert rerec_task.main([f"SFT={sft_folder}", f"ReRec={out}", "--reference-run", str(out), "--out", str(table),
                            "--resamples", "200"]) == 0
    results = json.loads(table.read_text())
    assert results["rows"]["ReRec"]["hit@1"] == pytest.approx(evaluation["rerec"]["hit@1"])  # same greedy decoding
    assert results["rows"]["SFT"]["hit@1"] == pytest.approx(evaluation["sft"]["hit@1"])
    interval = results["rows"]["ReRec"]["hit@1 - SFT (95% CI)"]
    assert interval["low"] <= interval["difference"] <= interval["high"]
    assert results["baselines"]["random"]["hit@1"] == 0.05
    assert {"popularity", "random"} <= set(results["baselines"]) and len(results["baselines"]) == 3


# ----------------------------------------------------------------------------- constrained decoding


@pytest.fixture(scope="module")
def demo_tokenizer():
    from models.tiny import train_tokenizer

    texts = [f"I like Drama.\n{name} is Drama.\nIt shares Drama with {other}.\n\\boxed{{{name}}}"
             for name in NAMES for other in NAMES]
    return train_tokenizer(texts * 3, vocab_size=320)


def _allowed(hook, tokens, prompt_index=0):
    """The allowed-token sets the hook leaves at every position of one teacher-forced completion."""
    ids = torch.tensor([tokens])
    logits = hook(torch.zeros(1, len(tokens), hook.newline_counts.numel()), torch.tensor([prompt_index]), ids, 0)
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits[0]]


def test_constraint_forces_candidates_in_line_one_and_the_box(demo_tokenizer):
    from experiments.rerec_task import CandidateConstraint

    tok = demo_tokenizer
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    candidates = [NAMES[:3], NAMES[2:]]  # prompt 0: Gump, Terminal, Cast Away; prompt 1: Cast Away, Psycho, Amélie
    hook = CandidateConstraint.build(tok, candidates)
    vocabulary = set(range(len(tok)))
    head, name_line, box = encode("I like Drama.\n"), encode("The Terminal (2004) is Drama.\n"), encode(
        "\\boxed{The Terminal (2004)}")
    tokens = head + name_line + box + [tok.eos_token_id]
    allowed = _allowed(hook, tokens)
    assert all(sets == vocabulary for sets in allowed[:len(head)])  # line 0 is free
    first_tokens = {encode(name)[0] for name in NAMES[:3]}
    assert allowed[len(head)] == first_tokens  # line 1 starts with a candidate of this prompt
    terminal = encode("The Terminal (2004)")
    for offset in range(1, len(terminal)):  # then follows the chosen candidate's tokens
        assert terminal[offset] in allowed[len(head) + offset]
        assert len(allowed[len(head) + offset]) <= 2  # at most the two titles sharing the prefix so far
    assert allowed[len(head) + len(terminal)] == vocabulary  # the name is complete: free again
    box_start = len(head) + len(name_line)
    assert allowed[box_start] == vocabulary  # the backslash itself is free
    boxes = [encode(f"\\boxed{{{name}}}") for name in NAMES[:3]]
    for offset in range(1, len(box)):
        assert allowed[box_start + offset] == {b[offset] for b in boxes if b[:offset] == box[:offset] and len(b) > offset}
    assert allowed[box_start + len(box)] == {tok.eos_token_id}  # the completion ends with its box
    assert _allowed(hook, tokens, prompt_index=1)[len(head)] == {encode(name)[0] for name in NAMES[2:]}


def test_constraint_step_by_step_equals_all_positions_at_once(demo_tokenizer):
    """The sampler calls the hook one position at a time, the recompute on whole chunks: same masks."""
    from experiments.rerec_task import CandidateConstraint

    tok = demo_tokenizer
    hook = CandidateConstraint.build(tok, [NAMES[:3], NAMES[2:]])
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [encode("I like Drama.\nCast Away (2000) is Drama.\n\\boxed{Cast Away (2000)}") + [tok.eos_token_id],
            encode("Drama\n\nPsycho (1960)\n\\boxed{Psycho (1960)}") + [tok.eos_token_id],
            torch.randint(0, len(tok), (30,), generator=torch.Generator().manual_seed(0)).tolist()]
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [tok.pad_token_id] * (length - len(row)) for row in rows])
    prompts = torch.tensor([0, 1, 1])
    logits = torch.randn(3, length, len(tok), generator=torch.Generator().manual_seed(1))
    at_once = hook(logits, prompts, ids, 0)
    for t in range(length):
        step = hook(logits[:, t:t + 1], prompts, torch.cat([ids[:, :t], torch.zeros(3, 1, dtype=torch.long)], 1), t)
        torch.testing.assert_close(step[:, 0], at_once[:, t])
    assert torch.isfinite(at_once).any(dim=2).all()  # never a position with no allowed token
    with pytest.raises(ValueError, match="prompt indices"):
        hook(logits, torch.tensor([0, 1, 2]), ids, 0)


def test_evaluation_uses_the_split_constraint(demo_tokenizer):
    task = toy_task()
    task.bind(None, demo_tokenizer)
    seen = {}

    def generate(chats, prompt_indices=None, logits_hook=None):
        seen.update(indices=prompt_indices, hook=logits_hook)
        return [CORRECT] * len(chats)

    task.evaluate(generate, "val")
    assert seen == {"indices": [0], "hook": task.hooks["val"]} and task.logits_hook is task.hooks["train"]
    unconstrained = toy_task(constrained_decoding=False)
    unconstrained.bind(None, demo_tokenizer)
    assert unconstrained.logits_hook is None and unconstrained.hooks == {}
