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
