"""The RecPO task (experiments/recpo_task.py) on a six-movie fixture: rewards against an independent
forward and numpy, the table's refresh schedule and overwritten rows, the item term's gradient, exact
resume, evaluation with the baselines' definitions, bad inputs; and the quick experiment end to end."""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from algorithms.recpo import RecPO, RecPOConfig
from engine.learner import Learner, LearnerConfig
from engine.rollout import Rollout, SamplingConfig
from engine.tokens import encode_prompts, pad_token_lists
from engine.trainer import Trainer, TrainerConfig
from experiments.data.common import RecExample
from experiments.data.item_graph import build_item_graph
from experiments.data.movielens import Movie
from experiments.recpo_task import (
    ANSWER,
    RecPOTask,
    RecPOTaskConfig,
    Request,
    user_prompt,
    write_rationale,
)
from experiments.statistics import interval_dict
from fastdecode import fast_decoder
from models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer
from rewards.catalog import Catalog, Item
from tests.conftest import CORPUS, make_model

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

ITEMS = {1: Item("Alpha", 1950), 2: Item("Bravo", 1960), 3: Item("Charlie", 1970), 4: Item("Delta", 1980),
         5: Item("Echo", 1990), 6: Item("Foxtrot", 2000)}
ROW = {item_id: row for row, item_id in enumerate(sorted(ITEMS))}


def prompt(history):
    return user_prompt([(f"{ITEMS[i].title} ({ITEMS[i].year})", 4.0) for i in history])


def example(user, history, truth):
    return RecExample(id=f"user-{user}", messages=[], groundtruth=[ITEMS[i] for i in truth],
                      seen=[ITEMS[i] for i in history], seen_item_ids=list(history), history_item_ids=list(history))


def fixture_task(max_prompt_length=256, **settings):
    ids = sorted(ITEMS)
    descriptions = [f"{ITEMS[i].title} ({ITEMS[i].year}); genres: {'Drama' if i % 2 else 'Comedy'}" for i in ids]
    train = [Request(prompt([1, 2]), (ROW[1], ROW[2]), ROW[3], "You liked Alpha (1950). Next: a 1970s Drama movie."),
             Request(prompt([3]), (ROW[3],), ROW[4], "You liked Charlie (1970). Next: a 1980s Comedy movie."),
             Request(prompt([]), (), ROW[6], "Your history points in several directions. Next: a 2000s movie.")]
    val = [Request(prompt([1]), (ROW[1],), example=example(1, [1], [2, 3])),
           Request(prompt([4, 5]), (ROW[4], ROW[5]), example=example(2, [4, 5], [6])),
           Request(prompt([]), (), example=example(3, [], [1, 4]))]
    space = SimpleNamespace(recommendable_items=dict(ITEMS), unrecommendable_item_ids=frozenset({0}),
                            catalog=Catalog(ITEMS.values()))
    config = RecPOTaskConfig(**{"item_batch_size": 4, "refresh_every": 2, **settings})
    return RecPOTask(config, ids, descriptions, train, val, val, space, max_prompt_length)


@pytest.fixture(scope="module")
def recpo_tokenizer():
    return train_tokenizer(fixture_task().corpus() + CORPUS, vocab_size=400)


def bound(tokenizer, seed=0, **settings):
    task = fixture_task(**settings)
    model = make_model(tokenizer, seed=seed)
    task.prepare_policy(model, tokenizer)
    task.bind(model, tokenizer)
    return task, model


def plain_last_hidden(model, text, tokenizer):
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state[0, -1].numpy()


def item_hidden(task, model, tokenizer):
    """Every item's h_v from its own unpadded forward, [I, H]."""
    return np.stack([plain_last_hidden(model, tokenizer.apply_chat_template(chat, tokenize=False,
                                                                            add_generation_prompt=True) + ANSWER,
                                       tokenizer) for chat in task.item_chats])


def cosine_scores(users, items, temperature=0.02):
    users = users / np.linalg.norm(users, axis=1, keepdims=True)
    items = items / np.linalg.norm(items, axis=1, keepdims=True)
    return users @ items.T / temperature


def hand_rollout(task, tokenizer):
    """Prompts 0 and 2 (empty history), two paths each: <answer> reached, EOS, <answer> reached, budget cut."""
    texts = [("You liked Alpha", ANSWER), ("Next: a", tokenizer.eos_token), ("Comedy", ANSWER), ("Drama movie", None)]
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"]
                   + ([tokenizer.convert_tokens_to_ids(stop)] if stop else []) for text, stop in texts]
    completion_ids, completion_mask = pad_token_lists(completions, tokenizer.pad_token_id, "right", "cpu")
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [task.train_messages(0), task.train_messages(2)], 256, "cpu")
    return Rollout(prompt_ids.repeat_interleave(2, 0), prompt_mask.repeat_interleave(2, 0), completion_ids,
                   completion_mask, torch.zeros(completion_ids.shape), torch.tensor([0, 0, 1, 1]),
                   torch.tensor([0, 0, 2, 2]), torch.tensor([True, True, True, False]), 1.0)


# ---------------------------------------------------------------------------
# the policy and its prompts
# ---------------------------------------------------------------------------


def test_prepare_policy_adds_one_answer_token_once():
    tokenizer = train_tokenizer(fixture_task().corpus() + CORPUS, vocab_size=400)
    task, model = fixture_task(), make_model(tokenizer)
    before = len(tokenizer)
    task.prepare_policy(model, tokenizer)
    task.prepare_policy(model, tokenizer)
    assert len(tokenizer) == before + 1 == model.get_input_embeddings().num_embeddings
    answer = tokenizer.convert_tokens_to_ids(ANSWER)
    assert tokenizer("a <answer>", add_special_tokens=False)["input_ids"][-1] == answer
    assert task.stop_token_ids(tokenizer) == [answer]


def test_prompt_longer_than_the_budget_is_a_clear_error(recpo_tokenizer):
    with pytest.raises(ValueError, match="trainer.max_prompt_length=12"):
        bound(recpo_tokenizer, max_prompt_length=12)


def test_empty_history_prompt_and_rationale():
    assert user_prompt([]).startswith("I have not rated any movie yet.")
    movies = {1: Movie(1, "Heat", 1995, "Heat", ("Drama", "Crime")), 2: Movie(2, "Up", 2009, "Up", ("Drama",)),
              3: Movie(3, "Alien", 1979, "Alien", ("Horror",)), 4: Movie(4, "Fargo", 1996, "Fargo", ("Crime", "Drama"))}
    triples = [("m.a", "film.film.actor", "m.x1"), ("m.a", "film.film.directed_by", "m.d1"),
               ("m.b", "film.film.actor", "m.x1"), ("m.c", "film.film.directed_by", "m.d2"),
               ("m.f", "film.film.actor", "m.x1"), ("m.f", "film.film.directed_by", "m.d3")]
    graph = build_item_graph(movies, {1: "m.a", 2: "m.b", 3: "m.c", 4: "m.f"}, triples, "fixture")
    # liked: Heat (3 shared: Crime, Drama, actor x1) before Up (2); Drama is more frequent than Crime
    assert write_rationale(graph, [(1, 5.0), (2, 4.0), (3, 2.0)], 4) == (
        "You liked Heat (1995) and Up (2009). Next: a 1990s Drama, Crime movie with actor x1.")
    assert write_rationale(graph, [], 4) == "Your history points in several directions. Next: a 1990s Drama, Crime movie."


# ---------------------------------------------------------------------------
# rewards and the item table
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ndcg_k", [1000, 2])
def test_rewards_match_an_independent_forward_and_numpy(recpo_tokenizer, ndcg_k):
    task, model = bound(recpo_tokenizer, ndcg_k=ndcg_k)
    rollout = hand_rollout(task, recpo_tokenizer)
    rewards = task.rewards([0, 0, 2, 2], ["", "", "", ""], rollout)
    items = item_hidden(task, model, recpo_tokenizer)
    np.testing.assert_allclose(task.table.hidden.numpy(), items, atol=1e-5)
    assert rewards.extras["reached_answer"].tolist() == [True, False, True, False]
    assert rewards.extras["target_item"].tolist() == [ROW[3], ROW[3], ROW[6], ROW[6]]
    for row, request in ((0, task.train[0]), (2, task.train[2])):
        ids = torch.cat([rollout.prompt_ids[row][rollout.prompt_mask[row]],
                         rollout.completion_ids[row][rollout.completion_mask[row]]])
        with torch.no_grad():
            user = model.model(input_ids=ids[None]).last_hidden_state[0, -1].numpy()
        np.testing.assert_allclose(rewards.extras["user_hidden"][row].numpy(), user, atol=1e-5)
        scores = cosine_scores(user[None], items)[0]
        target = request.target_row
        candidates = [item for item in range(len(ITEMS)) if item == target or item not in request.history_rows]
        rank = 1 + sum(scores[item] >= scores[target] for item in candidates if item != target)
        expected_ranking = 1 / math.log2(rank + 1) if rank <= ndcg_k else 0.0
        expected_probability = np.exp(scores[target]) / np.exp(scores[candidates]).sum()
        assert rewards.values[row, 0].item() == pytest.approx(expected_ranking, rel=1e-5)
        assert rewards.extras["catalog_probability"][row].item() == pytest.approx(expected_probability, rel=1e-4)
    assert rewards.values[[1, 3], 0].tolist() == [0.0, 0.0]  # no <answer>: the lowest reward
    assert rewards.extras["catalog_probability"][[1, 3]].tolist() == [0.0, 0.0]


def test_table_refresh_schedule_and_overwritten_target_rows(recpo_tokenizer):
    task, model = bound(recpo_tokenizer, refresh_every=2)
    rollout = hand_rollout(task, recpo_tokenizer)
    encodings = []
    for call in range(3):
        task.rewards([0, 0, 2, 2], [""] * 4, rollout)
        encodings.append(item_hidden(task, model, recpo_tokenizer))
        if call == 0:
            first_refresh = task.table.last_refresh_seconds
        with torch.no_grad():  # a new policy before the next step
            model.model.layers[0].mlp.up_proj.weight.add_(0.05 * torch.randn_like(model.model.layers[0].mlp.up_proj.weight))
        if call == 1:
            targets = [ROW[3], ROW[6]]
            others = [row for row in range(len(ITEMS)) if row not in targets]
            assert task.table.last_refresh_step == 0  # not due at step 1
            np.testing.assert_allclose(task.table.hidden.numpy()[targets], encodings[1][targets], atol=1e-5)
            np.testing.assert_allclose(task.table.hidden.numpy()[others], encodings[0][others], atol=1e-5)
            assert not np.allclose(encodings[0][others], encodings[1][others], atol=1e-4)
    assert task.table.last_refresh_step == 2 and task.reward_calls == 3
    np.testing.assert_allclose(task.table.hidden.numpy(), encodings[2], atol=1e-5)
    assert isinstance(first_refresh, float) and first_refresh > 0


def test_item_term_re_encodes_the_targets_with_gradient(recpo_tokenizer):
    task, model = bound(recpo_tokenizer)
    rewards = task.rewards([0, 0, 2, 2], [""] * 4, hand_rollout(task, recpo_tokenizer))
    candidates, column = rewards.extras["target_item"].unique(return_inverse=True)
    user = rewards.extras["user_hidden"]  # detached: any gradient below comes through the item prompts
    from_table = task.item_logprobs(model, user, column, candidates, encode=False)
    encoded = task.item_logprobs(model, user, column, candidates, encode=True)
    torch.testing.assert_close(encoded, from_table, atol=1e-5, rtol=1e-4)  # the rows written at reward time
    assert not from_table.requires_grad
    model.zero_grad(set_to_none=True)
    encoded.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------


def test_catalogue_log_probability_matches_numpy(recpo_tokenizer):
    task, _ = bound(recpo_tokenizer)
    generator = torch.Generator().manual_seed(0)
    task.table.refresh(lambda: torch.randn(6, 64, generator=generator), step=0)
    users, fresh = torch.randn(3, 64, generator=generator), torch.randn(2, 64, generator=generator)
    fresh_rows, targets = torch.tensor([4, 1]), torch.tensor([1, 4, 4])
    history = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    result = task.catalogue_logprobs(users, fresh, fresh_rows, targets, history)
    items = task.table.hidden.numpy().copy()
    items[[4, 1]] = fresh.numpy()
    scores = cosine_scores(users.numpy().astype(np.float64), items.astype(np.float64))
    for row in range(3):
        keep = [item for item in range(6) if item == targets[row] or not history[row, item]]
        expected = scores[row, targets[row]] - np.log(np.exp(scores[row, keep]).sum())
        assert result[row].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("softmax", ["catalogue", "in_batch"])
def test_warm_start_trains_the_format_and_the_head_and_is_cached(recpo_tokenizer, tmp_path, monkeypatch, softmax):
    from engine.sft import SFTConfig
    from experiments.config import ModelConfig

    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path))
    config = SimpleNamespace(sft=SFTConfig(steps=3, batch_size=2, warmup_steps=0, lr=1e-2), model=ModelConfig(),
                             seed=0, trainer=TrainerConfig(max_prompt_length=256),
                             sampling=SamplingConfig(max_new_tokens=64))
    task, model = bound(recpo_tokenizer, seed=5, warm_start_softmax=softmax)
    before = [p.detach().clone() for p in model.parameters()]
    history = task.warm_start(model, recpo_tokenizer, config)
    assert [row["step"] for row in history] == [1, 2, 3]
    assert all(np.isfinite([row["sft_loss"], row["head_loss"], row["head_only_loss"]]).all() for row in history)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    again, fresh_model = bound(recpo_tokenizer, seed=5, warm_start_softmax=softmax)
    assert again.warm_start(fresh_model, recpo_tokenizer, config) == history  # read from the cache
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sampling.max_new_tokens=4"):
        bound(recpo_tokenizer)[0].warm_start(make_model(recpo_tokenizer), recpo_tokenizer, SimpleNamespace(
            **{**vars(config), "sampling": SamplingConfig(max_new_tokens=4)}))


# ---------------------------------------------------------------------------
# the RL loop: exact resume
# ---------------------------------------------------------------------------


def force_answers(monkeypatch, answer_id):
    """Even rows of every rollout end with <answer> (a random tiny model rarely writes it)."""
    import engine.trainer as trainer_module

    real_sample = trainer_module.sample

    def sample_with_answers(*args, **kwargs):
        rollout = real_sample(*args, **kwargs)
        ids, ended = rollout.completion_ids.clone(), rollout.ended_with_eos.clone()
        last = rollout.completion_mask.sum(dim=1) - 1  # [B]
        for row in range(0, rollout.num_rows, 2):
            ids[row, last[row]] = answer_id
            ended[row] = True
        return Rollout(**{**rollout.__dict__, "completion_ids": ids, "ended_with_eos": ended})

    monkeypatch.setattr(trainer_module, "sample", sample_with_answers)


def test_resume_reproduces_the_uninterrupted_run(recpo_tokenizer, tmp_path, monkeypatch):
    force_answers(monkeypatch, recpo_tokenizer.convert_tokens_to_ids(ANSWER))

    def run(directory, steps, resume=False):
        task, model = bound(recpo_tokenizer, seed=2, refresh_every=3)
        strategy = RecPO(RecPOConfig(), tokenizer=recpo_tokenizer, task=task)
        learner = Learner(model, LearnerConfig(lr=1e-2, micro_batch_size=3, clip_ratio_high=0.28,
                                               loss_agg_mode="seq_mean_token_mean"), strategy)
        trainer = Trainer(model, recpo_tokenizer, task, strategy, learner,
                          TrainerConfig(prompts_per_step=2, group_size=2, max_steps=steps),
                          SamplingConfig(max_new_tokens=6), directory, make_decoder=fast_decoder)
        if resume:
            assert trainer.resume(directory) == 2
        metrics = []
        while trainer.step < steps:
            metrics.append(trainer.train_step())
            trainer.step += 1
        trainer.save()
        return model, task, metrics

    straight_model, straight_task, metrics = run(tmp_path / "straight", 5)
    assert any(m["item_loss"] != 0 for m in metrics)  # the item term really trained
    run(tmp_path / "resumed", 2)
    resumed_model, resumed_task, _ = run(tmp_path / "resumed", 5, resume=True)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(straight_task.table.hidden, resumed_task.table.hidden)
    assert (straight_task.reward_calls, straight_task.table.last_refresh_step) == (5, 3)
    assert (resumed_task.reward_calls, resumed_task.table.last_refresh_step) == (5, 3)


def test_task_state_from_another_backbone_is_a_clear_error(recpo_tokenizer):
    task, _ = bound(recpo_tokenizer)
    task.rewards([0, 0, 2, 2], [""] * 4, hand_rollout(task, recpo_tokenizer))
    narrow = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                              intermediate_size=64), len(recpo_tokenizer),
                              recpo_tokenizer.pad_token_id, recpo_tokenizer.eos_token_id)
    other = fixture_task()
    with pytest.raises(RuntimeError, match="bind"):
        other.load_state_dict(task.state_dict())
    other.prepare_policy(narrow, recpo_tokenizer)
    other.bind(narrow, recpo_tokenizer)
    with pytest.raises(ValueError, match="hidden size"):
        other.load_state_dict(task.state_dict())
    with pytest.raises(RuntimeError, match="bind"):
        fixture_task().rewards([0], [""], None)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


def test_evaluation_ranks_the_catalogue_as_the_baselines_do(recpo_tokenizer):
    task, model = bound(recpo_tokenizer)
    task.rewards([0, 0, 2, 2], [""] * 4, hand_rollout(task, recpo_tokenizer))
    table_before = task.table.hidden.clone()
    result = task.evaluate(lambda chats, prompt_indices=None, logits_hook=None: [""] * len(chats), "val")
    assert torch.equal(task.table.hidden, table_before)  # evaluation encodes its own table
    items = item_hidden(task, model, recpo_tokenizer)
    expected = {key: [] for key in ("recall@5", "ndcg@5")}
    for request in task.splits["val"]:
        text = recpo_tokenizer.apply_chat_template([{"role": "user", "content": request.prompt}], tokenize=False,
                                                   add_generation_prompt=True) + ANSWER
        scores = cosine_scores(plain_last_hidden(model, text, recpo_tokenizer)[None], items)[0]
        ranked = [int(row) for row in np.argsort(-scores, kind="stable") if row not in request.history_rows]
        truth = {ROW[ITEM_ID[item]] for item in request.example.groundtruth}
        hits = [1.0 if row in truth else 0.0 for row in ranked[:5]]
        expected["recall@5"].append(sum(hits) / len(truth))
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(truth), 5)))
        expected["ndcg@5"].append(sum(hit / math.log2(i + 2) for i, hit in enumerate(hits)) / ideal)
    for key, values in expected.items():
        assert result[key] == pytest.approx(np.mean(values), abs=1e-9)
        assert result[f"head_only/{key}"] == pytest.approx(result[key], abs=1e-9)  # empty reasoning = no reasoning
    assert result["table_refresh_s"] > 0 and result["reasoning_tokens"] == 0.0


ITEM_ID = {item: item_id for item_id, item in ITEMS.items()}


def test_paired_bootstrap_interval():
    generator = np.random.default_rng(0)
    first = generator.random(400)
    interval = interval_dict(first + 0.1, first, resamples=500)
    assert interval["difference"] == pytest.approx(0.1) and interval["low"] == pytest.approx(0.1)
    noisy = interval_dict(first, generator.random(400), resamples=2000)
    spread = np.std(first - generator.random(400), ddof=1) / math.sqrt(400)
    assert noisy["low"] < noisy["difference"] < noisy["high"]
    assert noisy["high"] - noisy["low"] == pytest.approx(2 * 1.96 * spread, rel=0.2)
    with pytest.raises(ValueError, match="paired"):
        interval_dict(first, first[:3])


# ---------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------

SHARED_DATA = Path(os.environ.get("RECRL_DATA_DIR") or "/nonexistent-recrl-data")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.kg").is_file(),
                    reason="ML-100K (with its knowledge graph) not found under $RECRL_DATA_DIR")
def test_quick_experiment_runs_end_to_end(tmp_path, monkeypatch):
    from experiments.run import main

    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["recpo_ml100k", "--quick", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    for stage in ("sft", "recpo", "recpo/last"):
        assert {"ndcg@10", "recall@20", "head_only/ndcg@10", "table_refresh_s"} <= set(results[stage])
    selection_file = tmp_path / "run" / "selection.json"
    selection = json.loads(selection_file.read_text()) if selection_file.is_file() else results["selection"]
    assert selection["metric"] == "ndcg@10" and selection["split"] == "val"
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("item_loss" in row for row in steps if not row.get("eval"))
