"""The recommendation task's rewards and the headline experiment end to end."""

import copy
import json

import numpy as np
import pytest
import torch

from experiments import run
from experiments.data import candidate_data_dirs
from experiments.data.common import RecData, RecExample
from experiments.rec_task import RecommendationTask
from rewards.catalog import Catalog, Item


def _movielens_available() -> bool:
    return any((d / "ml-100k" / "ml-100k.inter").exists() or (d / "ml-100k" / "u.data").exists()
               for d in candidate_data_dirs(None))


def _task(kind):
    catalog = Catalog([Item("Heat", 1995), Item("Fargo", 1996), Item("Casino", 1995), Item("Alien", 1979)])
    example = RecExample(id="u1", messages=[{"role": "user", "content": "recommend"}],
                         groundtruth=[Item("Fargo", 1996), Item("Alien", 1979)], seen=[Item("Heat", 1995)],
                         demonstration="Fargo (1996)\nAlien (1979)\nCasino (1995)")
    data = RecData(train=[example], val=[], test=[example], catalog=catalog, source="toy", list_length=3)
    return RecommendationTask(data, list_length=3, reward_kind=kind)


def test_per_rank_and_sequence_rewards():
    completions = ["Heat (1995)\nFargo (1996)\nAlien (1979)", "Alien (1979)\nnot a movie\nFargo (1997)"]
    hits = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # seen item scores 0; a malformed line keeps its rank
    torch.testing.assert_close(_task("exp_inf").rewards([0, 0], completions), hits)
    d = torch.tensor([1.0, 1 / torch.log2(torch.tensor(3.0)), 0.5])  # discounts 1/log2(k+1)
    log_decay = torch.stack([(hits[:, k:] * d[k:]).sum(1) for k in range(3)], dim=1)
    torch.testing.assert_close(_task("log_decay").rewards([0, 0], completions), log_decay)
    idcg = float(d[0] + d[1])  # |GT| = 2
    expected_ndcg = torch.tensor([float(d[1] + d[2]) / idcg, float(d[0] + d[2]) / idcg])
    torch.testing.assert_close(_task("ndcg").rewards([0, 0], completions), expected_ndcg)


def test_evaluate_and_demonstrations():
    task = _task("exp_inf")
    chats, answers = task.demonstrations()
    assert answers == ["Fargo (1996)\nAlien (1979)\nCasino (1995)"]
    metrics = task.evaluate(lambda chats: ["Fargo (1996)\nAlien (1979)"] * len(chats))
    assert metrics["recall@5"] == 1.0 and metrics["ndcg@5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reward_kind"):
        RecommendationTask(task.data, 3, "dcg")


@pytest.mark.slow
@pytest.mark.skipif(not _movielens_available(), reason="MovieLens-100K not in the data dir (set RECRL_DATA_DIR)")
def test_rank_grpo_reddit_quick_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert run.main(["rank_grpo_reddit", "--quick", "--out", str(out)]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "MovieLens-100K" in first_line or "Reddit-v2" in first_line
    evaluation = json.loads((out / "eval.json").read_text())
    for stage in ("sft", "rank_grpo"):
        for k in (5, 10, 20):
            assert 0.0 <= evaluation[stage][f"recall@{k}"] <= 1.0
            assert 0.0 <= evaluation[stage][f"ndcg@{k}"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["data_source"] in ("movielens-100k", "reddit-v2")
    assert config["config"]["task"]["list_length"] is None  # the data source's own
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_unit_10" in row for row in rows) and not any("reward_unit_11" in row for row in rows)


TITLES = [("Heat", 1995), ("Fargo", 1996), ("Casino", 1995), ("Alien", 1979), ("Aliens", 1986), ("Se7en", 1995),
          ("Jaws", 1975), ("Up", 2009), ("Her", 2013), ("Rocky", 1976), ("Psycho", 1960), ("Vertigo", 1958),
          ("Brazil", 1985), ("Amadeus", 1984), ("Gandhi", 1982), ("Tootsie", 1982), ("Witness", 1985),
          ("Platoon", 1986), ("Big", 1988), ("Ghost", 1990), ("Speed", 1994), ("Clueless", 1995)]


def write_reddit_v2(root, records_per_split=6):
    """A small Reddit-v2 folder in the release's layout: prompts ask for 20 movies."""
    folder = root / "reddit-v2"
    folder.mkdir(parents=True)
    (folder / "catalog.tsv").write_text("title\tyear\n" + "".join(f"{t}\t{y}\n" for t, y in TITLES))
    for split in ("train", "validation", "test"):
        lines = []
        for index in range(records_per_split):
            liked = TITLES[index % len(TITLES)]
            answer = [TITLES[(index + k) % len(TITLES)] for k in range(1, 21)]
            lines.append(json.dumps({
                "prompt": [{"role": "user", "content": f"I liked {liked[0]} ({liked[1]}). Recommend 20 movies, "
                                                       "one per line as Title (Year)."}],
                "completion": [{"role": "assistant", "content": "\n".join(f"{t} ({y})" for t, y in answer)}],
                "groundtruth_with_release_year": [[t, str(y)] for t, y in answer[:3]],
                "seen_titles": [liked[0]],
            }))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_headline_runs_on_reddit_v2_with_its_list_length(tmp_path, monkeypatch, capsys):
    """With Reddit-v2 conversations in the data dir the headline takes N = 20 from them (no --set needed)."""
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    data = write_reddit_v2(tmp_path / "data")
    out = tmp_path / "run"
    tiny = ["--set", "sft.steps=4", "--set", "max_steps=2", "--set", "vocab_size=300", "--set", "hidden_size=32",
            "--set", "intermediate_size=64", "--set", "num_layers=1", "--set", "max_new_tokens=24"]
    assert run.main(["rank_grpo_reddit", "--quick", "--data-dir", str(data), "--out", str(out), *tiny]) == 0
    assert "Reddit-v2" in capsys.readouterr().out.splitlines()[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_unit_20" in row for row in rows)
    assert json.loads((out / "config.json").read_text())["data_source"] == "reddit-v2"
    # an explicit list length that the prompts do not ask for is refused before any training
    assert run.main(["rank_grpo_reddit", "--quick", "--data-dir", str(data), "--out", str(tmp_path / "other"),
                     "--set", "task.list_length=10", *tiny]) == 2
    assert "the reddit-v2 prompts ask for 20 items" in capsys.readouterr().err


def test_item_tokens_one_token_per_title_round_trip_and_idempotent(tokenizer):
    from conftest import make_model
    from experiments.rec_task import add_item_tokens

    tokenizer = copy.deepcopy(tokenizer)
    model = make_model(tokenizer)
    rows_before = model.get_input_embeddings().weight.shape[0]
    titles = ["Heat (1995)", "Fargo (1996)", "The Shawshank Redemption (1994)", "Fargo (1996)"]
    assert add_item_tokens(tokenizer, model, titles) == 3  # the duplicate counts once
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == rows_before + 3
    text = "Fargo (1996)\nHeat (1995)\nThe Shawshank Redemption (1994)"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 5  # three titles and two newlines
    assert tokenizer.decode(ids) == text
    weights = model.get_input_embeddings().weight.detach().clone()
    assert add_item_tokens(tokenizer, model, titles) == 0  # idempotent: nothing added, nothing resized
    torch.testing.assert_close(model.get_input_embeddings().weight, weights)


def test_example_metrics_per_user_in_split_order():
    task = _task("exp_inf")
    task.splits["test"] = [task.data.test[0]] * 2
    replies = iter(["Fargo (1996)\nCasino (1995)", "Casino (1995)\nAlien (1979)"])
    metrics, completions = task.example_metrics(lambda chats: [next(replies) for _ in chats])
    assert completions == ["Fargo (1996)\nCasino (1995)", "Casino (1995)\nAlien (1979)"]
    # |GT| = 2: recall@10 = hits / 2; ndcg@10 = DCG / (1 + 1/log2(3))
    idcg = 1 + 1 / np.log2(3)
    assert [m["recall@10"] for m in metrics] == [0.5, 0.5]
    assert [m["ndcg@10"] for m in metrics] == pytest.approx([1 / idcg, (1 / np.log2(3)) / idcg])


def test_item_constraint_masks_repeats_and_seen_items_at_every_position():
    from experiments.rec_task import ItemConstraint

    heat, fargo, alien = Item("Heat", 1995), Item("Fargo", 1996), Item("Alien", 1979)
    token_of = {heat: 5, fargo: 6, alien: 7}  # vocabulary of 9: tokens 0-4 and 8 are not items
    examples = [RecExample(id="a", messages=[], groundtruth=[], seen=[heat]),
                RecExample(id="b", messages=[], groundtruth=[], seen=[])]
    completions = torch.tensor([[6, 1, 6, 1, 5], [5, 1, 7, 1, 5]])  # [2, 5]
    # banned item tokens per position, by hand (row a has seen Heat = 5)
    unseen = [[{5}, {5, 6}, {5, 6}, {5, 6}, {5, 6}], [set(), {5}, {5}, {5, 7}, {5, 7}]]
    no_repeat = [[set(), {6}, {6}, {6}, {6}], [set(), {5}, {5}, {5, 7}, {5, 7}]]
    for flag, expected in ((True, unseen), (False, no_repeat)):
        constraint = ItemConstraint(examples, token_of, 9, unseen=flag)
        masked = constraint(torch.zeros(2, 5, 9), torch.tensor([0, 1]), completions, 0)  # recompute: all positions
        for row in range(2):
            for position in range(5):
                assert set(torch.isinf(masked[row, position]).nonzero().flatten().tolist()) == expected[row][position]
        for position in range(5):  # the sampler's calls: one position, the tokens so far
            step = constraint(torch.zeros(2, 1, 9), torch.tensor([0, 1]), completions[:, : position + 1], position)
            torch.testing.assert_close(step[:, 0], masked[:, position])
        chunk = constraint(torch.zeros(2, 2, 9), torch.tensor([0, 1]), completions[:, :4], 2)  # a later chunk
        torch.testing.assert_close(chunk, masked[:, 2:4])
    with pytest.raises(ValueError, match="prompt index"):  # -1: the sampler was given no prompt indices
        ItemConstraint(examples, token_of, 9, unseen=True)(torch.zeros(1, 1, 9), torch.tensor([-1]), completions[:1], 0)
    with pytest.raises(ValueError, match="item_tokens"):
        RecommendationTask(_task("exp_inf").data, 3, "exp_inf", decode_constraint="unseen")


def test_sampler_log_probs_equal_the_recompute_under_the_item_constraint(tokenizer):
    """Rollouts under `unseen`: no item twice, no seen item, and the learner's recompute under the
    same hook reproduces the sampler's log-probs (so the ratio starts at exactly 1)."""
    from conftest import make_model, recompute_gaps
    from engine.rollout import SamplingConfig, sample
    from engine.tokens import encode_prompts
    from rewards.lists import format_item

    items = [Item("Heat", 1995), Item("Fargo", 1996), Item("Casino", 1995), Item("Alien", 1979), Item("Jaws", 1975)]
    examples = [RecExample(id="a", messages=[{"role": "user", "content": "recommend"}], groundtruth=[items[1]],
                           seen=[items[0], items[3]]),
                RecExample(id="b", messages=[{"role": "user", "content": "movies please"}], groundtruth=[items[2]],
                           seen=[])]
    data = RecData(train=examples, val=[], test=[], catalog=Catalog(items), source="toy", list_length=3)
    task = RecommendationTask(data, 3, "exp_inf", item_tokens=True, decode_constraint="unseen")
    tokenizer = copy.deepcopy(tokenizer)
    model = make_model(tokenizer)
    task.prepare_policy(model, tokenizer)
    item_token = {item: tokenizer.convert_tokens_to_ids(format_item(item)) for item in items}
    is_item = torch.zeros(len(tokenizer), dtype=torch.bool)  # [V]
    is_item[list(item_token.values())] = True

    def biased(logits, prompt_indices, completion_ids, start):  # the random model names items often
        return task.logits_hook(logits + 5.0 * is_item, prompt_indices, completion_ids, start)

    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.messages for e in examples], 64, torch.device("cpu"))
    rollout = sample(model, prompt_ids, prompt_mask, 8, SamplingConfig(max_new_tokens=10), [tokenizer.eos_token_id],
                     tokenizer.pad_token_id, torch.Generator().manual_seed(0), logits_hook=biased,
                     prompt_indices=torch.tensor([0, 1]))
    named = 0
    for row in range(rollout.num_rows):
        tokens = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
        item_tokens = [t for t in tokens if is_item[t]]
        seen = {item_token[item] for item in examples[int(rollout.prompt_indices[row])].seen}
        assert len(item_tokens) == len(set(item_tokens)) and not set(item_tokens) & seen, (row, item_tokens)
        named += len(item_tokens)
    assert named >= 16  # the bias makes the check bite: items are named, yet never repeated nor seen
    assert torch.isfinite(rollout.old_logprobs[rollout.completion_mask]).all()
    assert recompute_gaps(model, rollout, chunk_size=3, logits_hook=biased)[0] < 1e-5


@pytest.mark.skipif(not _movielens_available(), reason="MovieLens-100K not in the data dir (set RECRL_DATA_DIR)")
def test_dense_prefixes_multiply_training_requests_and_keep_val_and_test():
    from experiments.data import load_recommendation_data

    sparse = load_recommendation_data(None, list_length=10, source="movielens-100k", verbose=False,
                                      train_cuts_per_user=3)
    dense = load_recommendation_data(None, list_length=10, source="movielens-100k", verbose=False,
                                     train_cuts_per_user=None)
    assert 10 * len(sparse.train) <= len(dense.train) <= 50 * len(sparse.train)  # issue 15: 10 to 50 times more
    assert len({e.id for e in dense.train}) == len(dense.train)  # distinct requests
    assert len(dense.test) == 833
    for split in ("val", "test"):  # evaluation requests exactly as before: ids, prompts, targets, seen items
        before, after = getattr(sparse, split), getattr(dense, split)
        assert [(e.id, e.messages, e.groundtruth, e.seen) for e in before] == \
               [(e.id, e.messages, e.groundtruth, e.seen) for e in after]
