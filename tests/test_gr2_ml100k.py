"""GR2 on MovieLens-100K (needs RECRL_DATA_DIR): the pre-ranker's candidates against an independent EASE, the
SIDs of the catalogue, and `gr2_ml100k --quick` end to end with its summary."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import run
from experiments.gr2_task import GR2TaskConfig, build_task_from_settings, main as summarize_main


def _movielens_dir():
    data_dir = os.environ.get("RECRL_DATA_DIR")
    if data_dir and (Path(data_dir) / "ml-100k" / "ml-100k.inter").exists():
        return data_dir
    return None


pytestmark = pytest.mark.skipif(_movielens_dir() is None, reason="set RECRL_DATA_DIR to a folder with ml-100k/")


@pytest.fixture(scope="module")
def task():
    return build_task_from_settings(GR2TaskConfig(train_prefixes_per_user=1), 0, _movielens_dir())


def test_candidates_are_the_top_10_of_an_independent_ease(task):
    from experiments.data.movielens import load_movielens
    from experiments.data.next_item import next_item_requests

    conversations = load_movielens(_movielens_dir(), progress=False)
    matrix = conversations.interaction_matrix("train+val").astype(np.float64)  # test requests: fit on train + val
    gram = matrix.T @ matrix + 500.0 * np.eye(matrix.shape[1])
    precision = np.linalg.inv(gram)
    weights = -precision / np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    requests = next_item_requests(conversations, "test")
    checked = 0
    for request in requests:
        history = np.zeros(matrix.shape[1])
        history[list(request.history_item_ids)] = 1.0
        scores = history @ weights
        scores[list(request.seen_item_ids)] = -np.inf
        scores[list(conversations.unrecommendable_item_ids)] = -np.inf
        order = np.argsort(-scores, kind="stable")
        top = [int(i) for i in order[:10]]
        titles = {conversations.movies[i].item for i in top} | {conversations.movies[i].item
                                                                 for i in request.seen_item_ids}
        if request.target_item_id not in top or len(titles) < 10 + len(set(request.seen_item_ids)):
            continue  # not qualifying, or a second id of a listed or seen title (the task skips it)
        if scores[order[9]] - scores[order[10]] < 1e-4:
            continue  # a near tie at the cut: float32 and float64 may disagree
        (qualifying,) = [r for r in task.splits["test"] if r.user_id == request.user_id]
        assert set(qualifying.candidate_item_ids) == set(top)
        assert all(np.diff(scores[list(qualifying.candidate_item_ids)]) <= 1e-4)  # pre-ranker order
        checked += 1
    assert checked >= 100  # 140 of the 833 test requests qualify


def test_splits_and_semantic_ids(task):
    for split, requests in (("train", task.train), *task.splits.items()):
        assert requests, split
        for request in requests:
            assert len(set(request.candidate_item_ids)) == 10 and request.target_item_id in request.candidate_item_ids
            assert list(request.candidate_scores) == sorted(request.candidate_scores, reverse=True)
            assert 1 <= len(request.history_item_ids) <= 5
    report = task.semantic_ids.report
    assert report["num_items"] == 1682 and report["distinct_final"] >= 0.99
    counts = task.qualifying_report()
    assert counts["val"] == {"qualifying": len(task.splits["val"]), "requests": 854}  # every val request of ML-100K
    assert counts["test"]["requests"] == 833 and counts["test"]["qualifying"] == len(task.splits["test"])
    assert report["distinct_before"] < report["distinct_after"]
    assert all(task.semantic_ids.item_of(task.semantic_ids.sid_of(i)) == i for i in task.semantic_ids.item_ids)


@pytest.mark.slow
def test_gr2_ml100k_quick_end_to_end_and_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert run.main(["gr2_ml100k", "--quick", "--out", str(out)]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    for stage in ("sft", "dapo", "dapo/last"):
        for key in ("recall@1", "recall@5", "ndcg@5", "pre_rank/ndcg@5", "parse_frac", "copy_frac"):
            assert 0.0 <= evaluation[stage][key] <= 1.0
    from experiments.gr2_task import run_selection

    assert run_selection(out)["metric"] == "ndcg@5"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/copy_frac" in row for row in rows if row.get("split") == "val")
    checkpoint = sorted((out / "checkpoints").glob("step_*"))[-1]
    reward_log = torch.load(checkpoint / "components.pt", weights_only=False)["task"]["reward_log"]
    assert reward_log and all(0.0 <= entry["copy_frac"] <= 1.0 for entry in reward_log)
    summary_path = tmp_path / "summary.json"
    capsys.readouterr()
    assert summarize_main([str(out), "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["command"] == ["python", "-m", "experiments.gr2_task", str(out), "--json", str(summary_path)]
    assert list(summary["table"]) == ["pre-rank (EASE)", "SFT (rejection)", "RL gr2_ml100k"]
    # the re-evaluation reproduces the trainer's numbers (greedy decoding is deterministic)
    assert summary["table"]["pre-rank (EASE)"]["ndcg@5"] == pytest.approx(evaluation["sft"]["pre_rank/ndcg@5"])
    assert summary["table"]["SFT (rejection)"]["ndcg@5"] == pytest.approx(evaluation["sft"]["ndcg@5"])
    assert summary["table"]["RL gr2_ml100k"]["ndcg@5"] == pytest.approx(evaluation["dapo"]["ndcg@5"])
    low, high = summary["table"]["RL gr2_ml100k"]["minus_sft"]["ndcg@5"][1:]
    assert low <= high
    assert summary["input_order"]["gr2_ml100k"]["sampled_train"]
    run_record = summary["runs"]["gr2_ml100k"]
    assert "command" in run_record and run_record["rl_steps"] == 4  # run.main in-process records pytest's argv
    assert run_record["wall_time_s"] > 0
    qualifying = summary["qualifying_requests"]
    assert qualifying["test"]["qualifying"] == summary["test_requests"] <= qualifying["test"]["requests"]
    assert summary["semantic_ids"]["distinct_final"] >= 0.99 and len(summary["semantic_ids"]["codebook_usage"]) == 3
    assert "| RL steps |" in capsys.readouterr().out
