"""Popularity, item-kNN and EASE: the math on toy data, the teacher, and run_baselines on ML-100K."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.baselines import (
    EASERecommender,
    ItemKNNRecommender,
    PopularityRecommender,
    run_baselines,
    teacher_demonstration,
    top_k_item_ids,
)
from experiments.data.movielens import load_movielens
from rewards.lists import parse_list

SHARED_DATA = Path("/work/shared/data")
needs_movielens = pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file(),
                                     reason="ML-100K not available")

TOY = np.array([[1, 1, 0, 0, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 0, 0, 1, 1]], dtype=np.float32)


def test_ease_closed_form_solves_the_constrained_ridge_regression():
    l2 = 0.7
    model = EASERecommender(l2).fit(TOY)
    weights = model.weights.astype(np.float64)
    assert np.allclose(np.diag(weights), 0)
    # stationarity of ||X - XB||^2 + l2 ||B||^2 with diag(B) = 0: off-diagonal gradient vanishes
    gram = TOY.T.astype(np.float64) @ TOY
    gradient = gram @ weights - gram + l2 * weights
    off_diagonal = ~np.eye(5, dtype=bool)
    assert np.abs(gradient[off_diagonal]).max() < 1e-5
    np.testing.assert_allclose(model.scores([0, 1]), TOY[0, :0].sum() + weights[[0, 1]].sum(axis=0), atol=1e-6)


def test_item_knn_cosine_and_pruning():
    full = ItemKNNRecommender(neighbours=10).fit(TOY)
    norms = np.sqrt(TOY.sum(axis=0))
    expected = (TOY.T @ TOY) / np.outer(norms, norms)
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(full.similarity, expected, atol=1e-6)
    pruned = ItemKNNRecommender(neighbours=1).fit(TOY)
    assert ((pruned.similarity > 0).sum(axis=0) <= 1).all()


def test_recommend_excludes_and_breaks_ties_by_id():
    model = PopularityRecommender().fit(TOY)  # popularity [3, 3, 2, 2, 2]
    assert model.recommend([], 3) == [0, 1, 2]
    assert model.recommend([], 3, exclude_item_ids=[0, 2]) == [1, 3, 4]
    ids, scores = model.recommend([], 2, return_scores=True)
    assert ids == [0, 1] and scores == [3.0, 3.0]
    assert model.recommend([], 10, exclude_item_ids=range(5)) == []
    assert top_k_item_ids(np.array([0.1, 0.5, 0.3]), 5) == [1, 2, 0]
    with pytest.raises(RuntimeError):
        EASERecommender().recommend([0], 1)


@needs_movielens
def test_teacher_demonstration_is_a_clean_list():
    conversations = load_movielens(SHARED_DATA, list_length=10, download=False, progress=False)
    teacher = EASERecommender(200).fit(conversations.interaction_matrix("train"))
    example = conversations.val[0]
    text = teacher_demonstration(teacher, example, conversations)
    parsed = parse_list(text)
    assert len(parsed) == 10 and not text.endswith("\n")
    items = [line.item for line in parsed]
    assert len(set(items)) == 10
    assert all(item in conversations.catalog and item not in example.seen for item in items)


@needs_movielens
def test_run_baselines_quick(tmp_path, capsys):
    results = run_baselines(tmp_path, data_dir=str(SHARED_DATA), quick=True, list_length=20)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert set(written) == {"popularity", "item_knn", "ease"}
    for metrics in written.values():
        assert set(metrics) == {f"{name}@{k}" for k in (5, 10, 20) for name in ("recall", "ndcg")}
    details = json.loads((tmp_path / "baselines.json").read_text())
    assert set(details["hyperparameters"]) == {"item_knn", "ease"}
    # near the independent reference (EASE NDCG@10 ~0.12, popularity ~0.07)
    assert 0.09 < written["ease"]["ndcg@10"] < 0.17
    assert 0.05 < written["popularity"]["ndcg@10"] < 0.10
    assert written["ease"]["ndcg@10"] > written["popularity"]["ndcg@10"]
    assert "ease" in capsys.readouterr().out
