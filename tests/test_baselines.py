"""Popularity, item-kNN and EASE: the math on toy data, the teacher, chunked scoring, the command line,
and run_baselines on ML-100K."""

import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from experiments import baselines
from experiments.baselines import (
    EASERecommender,
    ItemKNNRecommender,
    PopularityRecommender,
    attach_demonstrations,
    evaluate_model,
    run_baselines,
    scored_examples,
    teacher_demonstration,
    top_k_item_ids,
)
from experiments.data import cache as download_cache
from experiments.data.movielens import Movie, MovieLensRatings, build_conversations, load_movielens
from rewards.lists import format_item, parse_list
from rewards.ranking import evaluate_list, mean_metrics

SHARED_DATA = Path(os.environ.get("RECRL_DATA_DIR") or "/nonexistent-recrl-data")
needs_movielens = pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file(),
                                     reason="ML-100K not found under $RECRL_DATA_DIR")

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


# ----------------------------------------------------------------------------- chunked scoring


def small_conversations():
    """3 users x 12 items rated in a fixed pseudo-random order; items 1..12 named "Movie i (2000+i)"."""
    generator = np.random.default_rng(0)
    users, items, ratings, times = [], [], [], []
    for user in (1, 2, 3):
        for step, item in enumerate(generator.permutation(12) + 1):
            users.append(user), items.append(int(item)), ratings.append(float(4 + step % 2)), times.append(step)
    movies = {item: Movie(item, f"Movie {item}", 2000 + item, f"Movie {item}") for item in range(1, 13)}
    ratings = MovieLensRatings(np.array(users), np.array(items), np.array(ratings, dtype=np.float32), np.array(times),
                               movies, {}, Path("synthetic"), "recbole")
    return build_conversations(ratings, list_length=3, train_cuts_per_user=None, min_history=2)


class RecordingEASE(EASERecommender):
    def __init__(self, l2):
        super().__init__(l2)
        self.batch_sizes = []

    def batch_scores(self, histories):
        self.batch_sizes.append(len(histories))
        return super().batch_scores(histories)


def test_scores_come_in_chunks_and_equal_the_matrix_product():
    conversations = small_conversations()
    examples = conversations.train
    assert len(examples) >= 5
    model = RecordingEASE(2.0).fit(conversations.interaction_matrix("train"))
    pairs = list(scored_examples(model, examples, chunk_size=2))
    assert model.batch_sizes == [2] * (len(examples) // 2) + ([1] if len(examples) % 2 else [])
    histories = np.zeros((len(examples), model.num_items), dtype=np.float64)  # [E, items]
    for row, example in enumerate(examples):
        histories[row, example.history_item_ids] = 1.0
    expected = histories @ model.weights.astype(np.float64)  # x_history B, module docstring
    assert [example for example, _ in pairs] == examples
    np.testing.assert_allclose(np.stack([scores for _, scores in pairs]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        next(scored_examples(model, examples, chunk_size=0))


def test_attach_demonstrations_and_evaluate_model_score_in_chunks(monkeypatch):
    conversations = small_conversations()
    examples = conversations.train
    model = RecordingEASE(2.0).fit(conversations.interaction_matrix("train"))
    monkeypatch.setattr(baselines, "SCORING_CHUNK_SIZE", 3)
    attach_demonstrations(examples, model, conversations)
    assert max(model.batch_sizes) == 3 and sum(model.batch_sizes) == len(examples)
    for example in examples:
        # reference: rank every unseen item by x_history B, ties by the smaller id
        scores = model.weights[example.history_item_ids].astype(np.float64).sum(axis=0)
        unseen = [item for item in range(1, 13) if item not in example.seen_item_ids]
        best = sorted(unseen, key=lambda item: (-scores[item], item))[:3]
        assert example.demonstration == "\n".join(format_item(conversations.item_of(item)) for item in best)
    model.batch_sizes.clear()
    metrics = evaluate_model(model, examples, conversations, list_length=3, ks=(1, 3))
    assert max(model.batch_sizes) == 3
    reference = mean_metrics(evaluate_list(example.demonstration, example, conversations.catalog, (1, 3))
                             for example in examples)
    assert metrics == pytest.approx(reference)


# ----------------------------------------------------------------------------- command line


def test_cli_missing_data_exits_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        baselines.main(["--data-dir", str(empty), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: data directory ") and str(empty) in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_cli_offline_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RECRL_DATA_DIR", raising=False)
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))

    def offline(*arguments, **keywords):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(download_cache, "fetch_from_grouplens", offline)
    monkeypatch.setattr(download_cache, "fetch_from_recbole_wheel", offline)
    with pytest.raises(SystemExit) as exit_info:
        baselines.main(["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "could not be downloaded" in errors[0] and "Fix: put" in errors[0]
    assert all(line.startswith(("[recrl] ", "error: ")) for line in lines)  # announcements, then the one error line


def test_cli_bad_list_length_and_out_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        baselines.main(["--list-length", "0", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--list-length 0: must be >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        baselines.main(["--out", str(tmp_path / "file" / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --out {tmp_path / 'file' / 'out'}: ") and error.count("\n") == 1
