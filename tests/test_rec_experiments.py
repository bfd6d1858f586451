"""The recommendation task's rewards and the headline experiment end to end."""

import json

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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_rank_1" in row for row in rows)  # per-rank rewards are logged
