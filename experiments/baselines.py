"""Classical baselines on the MovieLens conversational set, and the EASE teacher.

Models (X is the binary user x item matrix of the fitting interactions, column = item id):

* Popularity: score_i = Σ_u X_ui (number of users who rated item i).
* Item-kNN (cosine): S_ij = (X^T X)_ij / (‖X_:i‖ ‖X_:j‖), S_ii = 0, and for
  every target item j only its ``neighbours`` most similar items i keep S_ij;
  score_j = Σ_{i in history} S_ij.
* EASE (Steck, 2019): G = X^T X + λ I, P = G^{-1}, B_ij = -P_ij / P_jj,
  B_jj = 0; score = x_history B.

Protocol (the same for all three, and the same as for LLM outputs):

1. fit on every user's *train* part; choose the hyper-parameter (kNN
   neighbours, EASE λ) by NDCG@10 on the validation examples;
2. refit on train + validation with the chosen value;
3. for each test example, score from its history (train + val), remove the
   seen items (and items without a year), turn the top N item ids into
   ``Title (Year)`` items, and score them with ``rewards.ranking.evaluate_list``.

``run_baselines`` writes ``eval.json`` ({model: {"recall@5": .., ...}}) and
``baselines.json`` (chosen hyper-parameters, validation scores of every
candidate, dataset statistics), prints a table and returns the eval dict.

Scores are computed ``SCORING_CHUNK_SIZE`` histories at a time, so that tens of
thousands of dense training requests never need one [examples, items] matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from experiments.data.common import DataError, RecExample
from experiments.data.movielens import MovieLensConversations, format_statistics, load_movielens
from rewards.catalog import Item
from rewards.lists import format_list
from rewards.ranking import DEFAULT_KS, evaluate_list, mean_metrics

EASE_L2_GRID = (10.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0)
EASE_L2_GRID_QUICK = (100.0, 500.0)
KNN_NEIGHBOUR_GRID = (10, 20, 50, 100, 200, 400, 800)
KNN_NEIGHBOUR_GRID_QUICK = (50, 200)
SELECTION_METRIC = "ndcg@10"
SCORING_CHUNK_SIZE = 1024  # histories scored per matrix product: [1024, items] float32, ~7 MB on ML-100K


class ItemScorer:
    """Base class: ``fit(interaction_matrix)`` then ``scores`` / ``recommend`` from a history of item ids."""

    name = "scorer"

    def __init__(self) -> None:
        self.num_items: int | None = None

    def fit(self, interaction_matrix: np.ndarray) -> "ItemScorer":
        raise NotImplementedError

    def _check_fitted(self) -> int:
        if self.num_items is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(interaction_matrix) first")
        return self.num_items

    def history_vector(self, history_item_ids: Iterable[int]) -> np.ndarray:
        vector = np.zeros(self._check_fitted(), dtype=np.float32)
        ids = np.fromiter(history_item_ids, dtype=np.int64)
        if ids.size:
            if ids.min() < 0 or ids.max() >= vector.shape[0]:
                raise ValueError(f"history item ids must lie in [0, {vector.shape[0]}), got {ids.min()}..{ids.max()}")
            vector[ids] = 1.0
        return vector

    def scores(self, history_item_ids: Iterable[int]) -> np.ndarray:
        """Score of every item id (array index = item id) for a user with this history."""
        return self.batch_scores([list(history_item_ids)])[0]

    def batch_scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores [len(histories), num_items] for many histories at once."""
        raise NotImplementedError

    def history_matrix(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        return np.stack([self.history_vector(history) for history in histories]) if histories else np.zeros(
            (0, self._check_fitted()), dtype=np.float32)

    def recommend(
        self,
        history_item_ids: Iterable[int],
        k: int,
        exclude_item_ids: Iterable[int] = (),
        return_scores: bool = False,
    ) -> list[int] | tuple[list[int], list[float]]:
        """The k best item ids, best first, never an excluded id (ties: the smaller id first)."""
        return top_k_item_ids(self.scores(history_item_ids), k, exclude_item_ids, return_scores)


def top_k_item_ids(
    scores: np.ndarray, k: int, exclude_item_ids: Iterable[int] = (), return_scores: bool = False
) -> list[int] | tuple[list[int], list[float]]:
    """Indices of the k largest scores, best first (ties: smaller index first), excluded indices skipped."""
    scores = np.array(scores, dtype=np.float64)
    excluded = np.fromiter(exclude_item_ids, dtype=np.int64)
    if excluded.size:
        scores[excluded[(excluded >= 0) & (excluded < scores.shape[0])]] = -np.inf
    k = max(0, min(k, int(np.isfinite(scores).sum())))
    if k == 0:
        return ([], []) if return_scores else []
    candidates = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    ranked = candidates[np.lexsort((candidates, -scores[candidates]))]
    if return_scores:
        return ranked.tolist(), scores[ranked].tolist()
    return ranked.tolist()


class PopularityRecommender(ItemScorer):
    name = "popularity"

    def fit(self, interaction_matrix: np.ndarray) -> "PopularityRecommender":
        matrix = np.asarray(interaction_matrix, dtype=np.float32)
        self.num_items = matrix.shape[1]
        self.popularity = matrix.sum(axis=0)
        return self

    def batch_scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        self._check_fitted()
        return np.tile(self.popularity, (len(histories), 1))


class ItemKNNRecommender(ItemScorer):
    """Item-based k nearest neighbours with cosine similarity (module docstring)."""

    name = "item_knn"

    def __init__(self, neighbours: int = 100) -> None:
        super().__init__()
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {neighbours}")
        self.neighbours = neighbours

    def fit(self, interaction_matrix: np.ndarray) -> "ItemKNNRecommender":
        matrix = np.asarray(interaction_matrix, dtype=np.float64)
        self.num_items = matrix.shape[1]
        cooccurrence = matrix.T @ matrix
        norms = np.sqrt(np.diag(cooccurrence))
        norms[norms == 0] = 1.0
        similarity = cooccurrence / norms[:, None] / norms[None, :]
        np.fill_diagonal(similarity, 0.0)
        keep = min(self.neighbours, self.num_items)
        if keep < self.num_items:
            # for every target column j keep the `keep` largest S_ij
            threshold_rows = np.argpartition(-similarity, keep - 1, axis=0)[:keep]
            pruned = np.zeros_like(similarity)
            columns = np.arange(self.num_items)[None, :]
            pruned[threshold_rows, columns] = similarity[threshold_rows, columns]
            similarity = pruned
        self.similarity = similarity.astype(np.float32)
        return self

    def batch_scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        return self.history_matrix(histories) @ self.similarity


class EASERecommender(ItemScorer):
    """EASE (Steck 2019), closed form: B = I - P diag(1/diag(P)), P = (X^T X + λI)^-1, diag(B) = 0."""

    name = "ease"

    def __init__(self, l2: float = 500.0) -> None:
        super().__init__()
        if not l2 > 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        self.l2 = l2

    def fit(self, interaction_matrix: np.ndarray) -> "EASERecommender":
        matrix = np.asarray(interaction_matrix, dtype=np.float64)
        self.num_items = matrix.shape[1]
        gram = matrix.T @ matrix
        gram[np.diag_indices_from(gram)] += self.l2
        precision = np.linalg.inv(gram)
        weights = -precision / np.diag(precision)[None, :]
        np.fill_diagonal(weights, 0.0)
        self.weights = weights.astype(np.float32)
        return self

    def batch_scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        return self.history_matrix(histories) @ self.weights


# --------------------------------------------------------------------------- lists and teacher demonstrations
#
# SFT demonstrations without a blackbox LLM. ConvRec-R1's stage 1 (Remap-Reflect-Adjust,
# docs/rank_grpo.md §7) asks GPT-4o for a list, then (Remap) grounds it in the catalog by
# embedding similarity, (Reflect) re-scores the top candidates with the teacher as a judge,
# and (Adjust) corrects popularity bias with item-wise weights fit on the training ground
# truth; the top N become "Title (Year)" lines. Here an EASE model fit on the training
# interactions plays the teacher:
#   * like Remap, its items are catalog items by construction (no hallucinated titles);
#   * like Adjust, it is fit to the training interactions, so its popularity calibration
#     comes from data rather than from a generalist LLM's priors;
#   * seen items are removed, as ground truth never contains them.
# What differs: there is no world knowledge and no reading of the request text (EASE
# sees only the item ids of the history), no Reflect step, and the teacher is a
# collaborative-filtering model that is itself one of the baselines, so SFT imitates a
# model whose test score is known (EASE row of the README). The demonstrations are the
# teacher's top N for each training request, one "Title (Year)" per line, no numbering,
# no trailing newline, EOS right after the last item.


def scored_examples(
    model: ItemScorer, examples: Sequence[RecExample], chunk_size: int | None = None
) -> Iterator[tuple[RecExample, np.ndarray]]:
    """(example, scores [num_items]) for every example, scored ``chunk_size`` histories at a time
    (default ``SCORING_CHUNK_SIZE``)."""
    chunk_size = SCORING_CHUNK_SIZE if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        chunk_scores = model.batch_scores([example.history_item_ids for example in chunk])  # [chunk, items]
        yield from zip(chunk, chunk_scores)


def items_from_scores(
    scores: np.ndarray, exclude_item_ids: Iterable[int], conversations: MovieLensConversations, n: int
) -> list[Item]:
    """The top n *distinct* ``Item``s by score, excluded and unrecommendable ids removed.

    Two ML-100K ids can share one (title, year) (18 such pairs); the lower-scored
    id is skipped, as it would be a duplicate line, and the twin of an excluded
    (seen) id is excluded too.
    """
    recommendable = conversations.recommendable_items
    exclude = set(exclude_item_ids)
    excluded_items = {recommendable[item_id] for item_id in exclude if item_id in recommendable}
    exclude.update(conversations.unrecommendable_item_ids)
    requested = n + len(excluded_items) + 20
    while True:
        item_ids = top_k_item_ids(scores, requested, exclude)
        items: list[Item] = []
        for item_id in item_ids:
            item = recommendable[item_id]
            if item in excluded_items or item in items:
                continue
            items.append(item)
            if len(items) == n:
                return items
        if len(item_ids) < requested:  # every candidate was used
            return items
        requested *= 2


def recommendation_items(
    model: ItemScorer,
    history_item_ids: Sequence[int],
    exclude_item_ids: Iterable[int],
    conversations: MovieLensConversations,
    n: int,
) -> list[Item]:
    """The model's top n distinct ``Item``s for a history (see ``items_from_scores``)."""
    return items_from_scores(model.scores(history_item_ids), exclude_item_ids, conversations, n)


def teacher_demonstration(
    teacher: ItemScorer, example: RecExample, conversations: MovieLensConversations, n: int | None = None
) -> str:
    """The teacher's N-item answer to an example as ``Title (Year)`` lines (seen items removed).

    Suitable as an SFT target (reference §1.1: single newlines, no numbering, no trailing newline).
    """
    n = conversations.list_length if n is None else n
    items = recommendation_items(teacher, example.history_item_ids, example.seen_item_ids, conversations, n)
    return format_list(items)


def attach_demonstrations(
    examples: Iterable[RecExample], teacher: ItemScorer, conversations: MovieLensConversations, n: int | None = None
) -> None:
    """Set ``example.demonstration`` from the teacher for every example (in place).

    Scores are computed in chunks of ``SCORING_CHUNK_SIZE`` examples (``scored_examples``).
    """
    n = conversations.list_length if n is None else n
    for example, scores in scored_examples(teacher, list(examples)):
        example.demonstration = format_list(items_from_scores(scores, example.seen_item_ids, conversations, n))


def fit_teacher(conversations: MovieLensConversations, l2: float = 500.0, part: str = "train") -> EASERecommender:
    """An EASE teacher fitted on the train part (or "train+val")."""
    return EASERecommender(l2).fit(conversations.interaction_matrix(part))


# --------------------------------------------------------------------------- evaluation


def evaluate_model(
    model: ItemScorer,
    examples: Sequence[RecExample],
    conversations: MovieLensConversations,
    list_length: int,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Mean Recall@K / NDCG@K of the model's ``Title (Year)`` lists, via the LLM metric code.

    Scores are computed in chunks of ``SCORING_CHUNK_SIZE`` examples (``scored_examples``).
    """
    return mean_metrics(
        evaluate_list(
            items_from_scores(scores, example.seen_item_ids, conversations, list_length),
            example,
            conversations.catalog,
            ks,
        )
        for example, scores in scored_examples(model, list(examples))
    )


def select_on_validation(
    build, grid: Sequence, conversations: MovieLensConversations, train_matrix: np.ndarray, list_length: int
) -> tuple[object, dict[str, dict[str, float]]]:
    """Fit ``build(value)`` for every grid value on train; return the best value by val NDCG@10 and all scores."""
    scores: dict[str, dict[str, float]] = {}
    best_value, best_score = None, -1.0
    for value in grid:
        metrics = evaluate_model(build(value).fit(train_matrix), conversations.val, conversations, list_length)
        scores[str(value)] = metrics
        if metrics[SELECTION_METRIC] > best_score:
            best_value, best_score = value, metrics[SELECTION_METRIC]
    return best_value, scores


def format_table(results: dict[str, dict[str, float]], hyperparameters: dict[str, dict]) -> str:
    columns = [f"{metric}@{k}" for k in DEFAULT_KS for metric in ("recall", "ndcg")]
    header = f"{'model':<12}" + "".join(f"{column:>11}" for column in columns) + "  chosen on val"
    lines = [header, "-" * len(header)]
    for model, metrics in results.items():
        chosen = ", ".join(f"{key}={value}" for key, value in hyperparameters.get(model, {}).items()) or "-"
        lines.append(f"{model:<12}" + "".join(f"{metrics[column]:>11.4f}" for column in columns) + f"  {chosen}")
    return "\n".join(lines)


def run_baselines(
    out_dir: Path, data_dir: str | None = None, quick: bool = False, list_length: int = 20
) -> dict[str, dict[str, float]]:
    """Fit, select, refit and evaluate popularity, item-kNN and EASE on MovieLens-100K (module docstring).

    Writes ``out_dir/eval.json`` and ``out_dir/baselines.json``; returns the eval dict
    ``{"popularity": {"recall@5": ..}, "item_knn": {..}, "ease": {..}}``.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conversations = load_movielens(data_dir, list_length=list_length)
    print(format_statistics(conversations.statistics))
    train_matrix = conversations.interaction_matrix("train")
    full_matrix = conversations.interaction_matrix("train+val")

    neighbour_grid = KNN_NEIGHBOUR_GRID_QUICK if quick else KNN_NEIGHBOUR_GRID
    l2_grid = EASE_L2_GRID_QUICK if quick else EASE_L2_GRID
    best_neighbours, knn_validation = select_on_validation(
        ItemKNNRecommender, neighbour_grid, conversations, train_matrix, list_length
    )
    best_l2, ease_validation = select_on_validation(EASERecommender, l2_grid, conversations, train_matrix, list_length)
    popularity_validation = evaluate_model(PopularityRecommender().fit(train_matrix), conversations.val,
                                           conversations, list_length)

    final_models: dict[str, ItemScorer] = {
        "popularity": PopularityRecommender(),
        "item_knn": ItemKNNRecommender(int(best_neighbours)),
        "ease": EASERecommender(float(best_l2)),
    }
    results = {
        name: evaluate_model(model.fit(full_matrix), conversations.test, conversations, list_length)
        for name, model in final_models.items()
    }
    hyperparameters = {"item_knn": {"neighbours": best_neighbours}, "ease": {"l2": best_l2}}
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    details = {
        "source": "movielens-100k",
        "protocol": "fit on train, select on val by " + SELECTION_METRIC + ", refit on train+val, evaluate on test",
        "list_length": list_length,
        "hyperparameters": hyperparameters,
        "validation": {"popularity": popularity_validation, "item_knn": knn_validation, "ease": ease_validation},
        "statistics": conversations.statistics,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "baselines.json").write_text(json.dumps(details, indent=2) + "\n")
    print(f"[baselines] test set ({len(conversations.test)} users), lists of {list_length}:")
    print(format_table(results, hyperparameters))
    print(f"[baselines] wrote {out_dir / 'eval.json'} and {out_dir / 'baselines.json'} "
          f"in {details['seconds']:.1f} s")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Classical baselines on the MovieLens-100K conversational set")
    parser.add_argument("--out", default="runs/baselines_ml100k", help="output directory")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $RECRL_DATA_DIR or ~/.cache/recrl)")
    parser.add_argument("--quick", action="store_true", help="small hyper-parameter grids")
    parser.add_argument("--list-length", type=int, default=20, help="recommendations per list (N)")
    arguments = parser.parse_args(argv)
    if arguments.list_length < 1:
        parser.error(f"--list-length {arguments.list_length}: must be >= 1")
    try:
        run_baselines(Path(arguments.out), arguments.data_dir, arguments.quick, arguments.list_length)
    except DataError as error:  # missing, incomplete or malformed data, offline download: one line, exit code 2
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:  # an --out that cannot be created or written
        print(f"error: --out {arguments.out}: {error.strerror or error} ({error.filename})", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
