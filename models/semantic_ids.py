"""Semantic IDs: short token codes for catalogue items, built from item text (GR2, arXiv 2602.07774).

GR2 mid-trains an LLM on *semantic IDs* (SIDs): each item is written as a few
new vocabulary tokens, one per quantisation level, e.g. ``<a_12><b_3><c_40>``,
so that similar items share leading tokens and every item keeps a unique code
(the paper reports >= 99% uniqueness).  The paper quantises text embeddings
with an RQ-VAE; recrl builds the same kind of code with no learned encoder
(docs/gr2.md says what is and is not taken from the paper):

1. Item vectors (``text_vectors``): TF-IDF over word unigrams and bigrams,
   sublinear term frequency and a smoothed inverse document frequency,

       w(t, d) = (1 + ln tf(t, d)) * (ln((1 + N) / (1 + df(t))) + 1),

   each row scaled to unit L2 norm (Manning, Raghavan & Schütze, *Introduction
   to Information Retrieval*, §6.2-6.4), then a rank-``dim`` truncated SVD
   X ≈ U S Vᵀ by randomised subspace iteration (Halko, Martinsson & Tropp,
   arXiv:0909.4061, Alg. 4.4) with a seeded Gaussian start; the item vectors
   are the rows of U S (latent semantic analysis).  Column signs are fixed so
   that each column's largest-magnitude entry of U is positive.

2. Residual quantisation (``build_semantic_ids``): r_1 = x; at level l,
   k-means with C centroids on the residuals gives code c_l = argmin_k
   ||r_l - e_{l,k}|| and the next residual r_{l+1} = r_l - e_{l,c_l}.  K-means
   uses k-means++ seeding (Arthur & Vassilvitskii 2007) from a generator seeded
   with (seed, level), a fixed number of Lloyd iterations (stopping early at a
   fixed point, which changes nothing), and re-seeds an empty cluster with the
   point currently farthest from its centroid.

3. Collision resolution, "random last level" (GR2's codebook ablation): items
   that share the whole code keep the one nearest the last-level centroid (the
   lowest index on ties); every other item of the group takes a last-level
   code drawn uniformly, with a generator seeded by (seed, levels), from the
   codes not yet used under the same (L-1)-level prefix.  A prefix holds at
   most C items, so when a prefix has more than C items the surplus keeps
   colliding.  ``SemanticIdConfig.full_prefix`` decides what then happens:
   ``"extra_level"`` (default) appends one more level to every item, code =
   position of the item among the items sharing its code (0 for unique items),
   so every SID is unique; ``"report"`` keeps L levels and counts the collisions
   left in the report (``item_of`` then refuses the ambiguous SIDs).

Tokens: level l (0-based) is the letter ``chr(ord('a') + l)``, code k is
``<{letter}_{k}>``.  ``add_sid_tokens`` adds all C tokens of every level to a
tokenizer as ordinary (non-special) added tokens, so that decoding with
``skip_special_tokens=True`` keeps them, and grows the model's embeddings.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FULL_PREFIX_POLICIES = ("extra_level", "report")
_WORD = re.compile(r"\w+")
_SID_FORMAT = "recrl-semantic-ids"
_MAX_LEVELS = 26


# --------------------------------------------------------------------------- item vectors


def _terms(text: str) -> list[str]:
    """Word unigrams and bigrams of a case-folded text."""
    words = _WORD.findall(text.casefold())
    return words + [f"{first} {second}" for first, second in zip(words, words[1:])]


def _tfidf_matrix(texts: list[str]) -> torch.Tensor:
    """Sparse TF-IDF matrix [N, V] (float64, COO), rows L2-normalised; terms in sorted order."""
    term_counts = [Counter(_terms(text)) for text in texts]
    empty = [index for index, counts in enumerate(term_counts) if not counts]
    if empty:
        raise ValueError(
            f"texts {empty[:10]} have no word characters; give every item a title or description "
            "(or drop those items before building semantic IDs)"
        )
    document_frequency = Counter(term for counts in term_counts for term in counts)
    vocabulary = {term: column for column, term in enumerate(sorted(document_frequency))}
    num_documents = len(texts)
    rows, columns, values = [], [], []
    for row, counts in enumerate(term_counts):
        weights = {
            term: (1.0 + math.log(count)) * (math.log((1 + num_documents) / (1 + document_frequency[term])) + 1.0)
            for term, count in counts.items()
        }
        norm = math.sqrt(sum(weight * weight for weight in weights.values()))
        for term, weight in weights.items():
            rows.append(row)
            columns.append(vocabulary[term])
            values.append(weight / norm)
    indices = torch.tensor([rows, columns], dtype=torch.long)  # [2, nnz]
    return torch.sparse_coo_tensor(
        indices, torch.tensor(values, dtype=torch.float64), (num_documents, len(vocabulary)), check_invariants=True
    ).coalesce()


def text_vectors(
    texts: list[str], dim: int, seed: int, power_iterations: int = 4, oversampling: int = 10
) -> np.ndarray:
    """Dense item vectors [N, dim] (float64): TF-IDF then a seeded randomised truncated SVD (module docstring)."""
    if not texts:
        raise ValueError("texts is empty; pass one text (title, genres, description) per item")
    matrix = _tfidf_matrix(list(texts))  # [N, V] sparse
    num_items, vocabulary_size = matrix.shape
    if not 1 <= dim <= min(num_items, vocabulary_size):
        raise ValueError(
            f"dim={dim} must be between 1 and min(#texts, #terms) = min({num_items}, {vocabulary_size}); "
            "lower dim (a rank-dim SVD needs at least dim items and dim distinct terms)"
        )
    transposed = matrix.t().coalesce()  # [V, N] sparse
    width = min(dim + oversampling, num_items, vocabulary_size)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(vocabulary_size, width, generator=generator, dtype=torch.float64)  # [V, W]
    basis = torch.linalg.qr(torch.sparse.mm(matrix, start)).Q  # [N, W]
    for _ in range(power_iterations):
        row_basis = torch.linalg.qr(torch.sparse.mm(transposed, basis)).Q  # [V, W]
        basis = torch.linalg.qr(torch.sparse.mm(matrix, row_basis)).Q  # [N, W]
    # basisᵀ X = Rᵀ Q_bᵀ with (Xᵀ basis) = Q_b R: its left singular vectors and values are those of Rᵀ [W, W].
    triangular = torch.linalg.qr(torch.sparse.mm(transposed, basis)).R  # [W, W]
    small_left, singular_values, _ = torch.linalg.svd(triangular.t())  # [W, W], [W]
    left = (basis @ small_left)[:, :dim]  # [N, dim]
    peak_rows = left.abs().argmax(dim=0)  # [dim]
    signs = torch.sign(left[peak_rows, torch.arange(dim)])  # [dim]
    return (left * signs * singular_values[:dim]).numpy()  # [N, dim] = U S


# --------------------------------------------------------------------------- residual k-means


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """||x_i - c_k||² [N, K] for points [N, D] and centroids [K, D], clamped at 0."""
    distances = (
        (points * points).sum(1, keepdims=True) - 2.0 * points @ centroids.T + (centroids * centroids).sum(1)
    )  # [N, K]
    return np.maximum(distances, 0.0)


def _kmeans_plus_plus(points: np.ndarray, num_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: first centre uniform, then each next centre with probability ∝ D(x)²."""
    num_points = points.shape[0]
    chosen = [int(rng.integers(num_points))]
    nearest = _squared_distances(points, points[chosen])[:, 0]  # [N]
    for _ in range(1, num_clusters):
        total = nearest.sum()
        # All points coincide with a centre already: any point is as good (duplicates).
        probabilities = nearest / total if total > 0 else np.full(num_points, 1.0 / num_points)
        chosen.append(int(rng.choice(num_points, p=probabilities)))
        nearest = np.minimum(nearest, _squared_distances(points, points[chosen[-1:]])[:, 0])
    return points[chosen].copy()  # [K, D]


def _kmeans(
    points: np.ndarray, num_clusters: int, iterations: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means from k-means++ seeds; returns (centroids [K, D], assignment [N]).

    Runs `iterations` Lloyd steps, stopping early when the assignment repeats: the centroids
    would then repeat too, so the result equals that of the full count.
    """
    num_points, dim = points.shape
    centroids = _kmeans_plus_plus(points, num_clusters, rng)  # [K, D]
    previous = None
    for _ in range(iterations):
        distances = _squared_distances(points, centroids)  # [N, K]
        assignment = distances.argmin(1)  # [N]
        if previous is not None and np.array_equal(assignment, previous):
            break
        counts = np.bincount(assignment, minlength=num_clusters)  # [K]
        flat_index = (assignment[:, None] * dim + np.arange(dim)).ravel()  # [N * D] cluster-major cell
        sums = np.bincount(flat_index, weights=points.ravel(), minlength=num_clusters * dim).reshape(num_clusters, dim)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = np.flatnonzero(~filled)
        if empty.size:  # re-seed each empty cluster with one of the worst-served points
            own_distance = distances[np.arange(num_points), assignment]  # [N]
            farthest = np.argsort(-own_distance, kind="stable")[: empty.size]
            centroids[empty[: farthest.size]] = points[farthest]
        previous = assignment
    return centroids, _squared_distances(points, centroids).argmin(1)


# --------------------------------------------------------------------------- semantic IDs


@dataclass(frozen=True)
class SemanticIdConfig:
    """Settings of the residual quantiser (module docstring)."""

    levels: int = 3  # L quantisation levels (GR2 uses 4 with an RQ-VAE)
    codebook_size: int = 64  # C codes per level
    kmeans_iterations: int = 50  # Lloyd iterations per level
    seed: int = 0
    full_prefix: str = "extra_level"  # what to do when a prefix holds more than C items: "extra_level" | "report"


def sid_token(level: int, code: int) -> str:
    """The vocabulary token of `code` at 0-based `level`, e.g. sid_token(1, 3) == "<b_3>"."""
    if not 0 <= level < _MAX_LEVELS:
        raise ValueError(f"level {level} is outside 0..{_MAX_LEVELS - 1} (one letter per level)")
    return f"<{chr(ord('a') + level)}_{code}>"


@dataclass
class SemanticIds:
    """One code row per item: `codes[i]` [L] is the SID of `item_ids[i]`.

    `codebook_sizes[l]` is the number of tokens of level l (C, or the size of
    the extra level); `report` holds the construction statistics.  Item ids are ints or
    strings (they must survive a JSON round trip).
    """

    item_ids: list[Any]
    codes: np.ndarray  # [N, L] int64
    codebook_sizes: list[int]
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or self.codes.shape[0] != len(self.item_ids):
            raise ValueError(f"codes must be [N, L] with N = {len(self.item_ids)} items; got shape {self.codes.shape}")
        if self.codes.shape[1] != len(self.codebook_sizes):
            raise ValueError(f"codes have {self.codes.shape[1]} levels but {len(self.codebook_sizes)} codebook sizes")
        if self.codes.size and (self.codes.min() < 0 or (self.codes >= np.asarray(self.codebook_sizes)).any()):
            raise ValueError("a code is outside its level's codebook [0, codebook_size)")
        _check_unique_items(self.item_ids)
        self.sids = ["".join(sid_token(level, int(code)) for level, code in enumerate(row)) for row in self.codes]
        self._row_of_item = {item: row for row, item in enumerate(self.item_ids)}
        self._items_of_sid: dict[str, list[Any]] = {}
        for item, sid in zip(self.item_ids, self.sids):
            self._items_of_sid.setdefault(sid, []).append(item)

    @property
    def levels(self) -> int:
        return self.codes.shape[1]

    def sid_of(self, item: Any) -> str:
        """The SID string of `item`, e.g. "<a_12><b_3><c_40>"."""
        if item not in self._row_of_item:
            raise KeyError(f"item {item!r} has no semantic ID; build the IDs over a catalogue that contains it")
        return self.sids[self._row_of_item[item]]

    def item_of(self, sid: str) -> Any:
        """The item whose SID is `sid` (whitespace inside `sid` is ignored)."""
        items = self._items_of_sid.get("".join(sid.split()))
        if items is None:
            raise KeyError(f"{sid!r} is not the semantic ID of any item")
        if len(items) > 1:
            raise KeyError(
                f"{sid!r} is shared by items {items[:10]}; rebuild with full_prefix='extra_level' "
                "or a larger codebook_size to make every SID unique"
            )
        return items[0]

    def vocabulary(self) -> list[str]:
        """Every (level, code) token, level-major: <a_0> .. <a_{C-1}>, <b_0>, ..."""
        return [sid_token(level, code) for level, size in enumerate(self.codebook_sizes) for code in range(size)]

    def save(self, path: str | Path) -> None:
        """Write item ids, codes, codebook sizes and the report as one JSON object."""
        odd = [item for item in self.item_ids if not isinstance(item, (int, str))]
        if odd:
            raise ValueError(f"item ids {odd[:5]} are not int or str; JSON cannot store them as ids")
        payload = {
            "format": _SID_FORMAT,
            "item_ids": list(self.item_ids),
            "codebook_sizes": list(self.codebook_sizes),
            "codes": self.codes.tolist(),
            "report": self.report,
        }
        Path(path).write_text(json.dumps(payload), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "SemanticIds":
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(payload, dict) or payload.get("format") != _SID_FORMAT:
            raise ValueError(f"{path} is not a semantic-ID file written by SemanticIds.save")
        codes = np.asarray(payload["codes"], dtype=np.int64).reshape(len(payload["item_ids"]), -1)
        return cls(payload["item_ids"], codes, payload["codebook_sizes"], payload["report"])


def _check_unique_items(item_ids: list[Any]) -> None:
    repeated = [item for item, count in Counter(item_ids).items() if count > 1]
    if repeated:
        raise ValueError(f"item ids {repeated[:10]} appear more than once; give each item exactly one row")


def _colliding_items(codes: np.ndarray) -> int:
    """Number of items whose code row [L] is shared with another item."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return int((counts[inverse.reshape(-1)] > 1).sum())


def _distinct_fraction(codes: np.ndarray) -> float:
    return np.unique(codes, axis=0).shape[0] / codes.shape[0]


def _random_last_level(
    codes: np.ndarray, last_distances: np.ndarray, codebook_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Resolve full-code collisions with free last-level codes under the same prefix (module docstring)."""
    codes = codes.copy()
    prefixes = [tuple(row) for row in codes[:, :-1].tolist()]
    used: dict[tuple, set[int]] = {}
    groups: dict[tuple, list[int]] = {}
    for row, prefix in enumerate(prefixes):
        used.setdefault(prefix, set()).add(int(codes[row, -1]))
        groups.setdefault((*prefix, int(codes[row, -1])), []).append(row)
    for full_code in sorted(groups):
        rows = groups[full_code]
        if len(rows) == 1:
            continue
        keeper = min(rows, key=lambda row: (last_distances[row], row))
        free = sorted(set(range(codebook_size)) - used[full_code[:-1]])
        for row in rows:
            if row == keeper or not free:
                continue
            code = free.pop(int(rng.integers(len(free))))
            codes[row, -1] = code
            used[full_code[:-1]].add(code)
    return codes


def _extra_level(codes: np.ndarray) -> np.ndarray:
    """Append a level: the position of each item among the items sharing its code row [N, L+1]."""
    seen: Counter = Counter()
    extra = np.zeros(codes.shape[0], dtype=np.int64)
    for row, code in enumerate(map(tuple, codes.tolist())):
        extra[row] = seen[code]
        seen[code] += 1
    return np.concatenate([codes, extra[:, None]], axis=1)


def build_semantic_ids(
    vectors: np.ndarray, item_ids: list[Any], config: SemanticIdConfig = SemanticIdConfig()
) -> SemanticIds:
    """Residual k-means codes [N, L] for item `vectors` [N, D], collisions resolved (module docstring)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    item_ids = list(item_ids)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [N, D] array; got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf; check the embedding step")
    if len(item_ids) != vectors.shape[0]:
        raise ValueError(f"{len(item_ids)} item ids for {vectors.shape[0]} vectors; pass one id per vector row")
    _check_unique_items(item_ids)
    if config.full_prefix not in FULL_PREFIX_POLICIES:
        raise ValueError(f"full_prefix={config.full_prefix!r}; use one of {FULL_PREFIX_POLICIES}")
    if not 1 <= config.levels < _MAX_LEVELS:
        raise ValueError(f"levels={config.levels}; use 1..{_MAX_LEVELS - 1} (GR2 uses 4)")
    if config.codebook_size < 2:
        raise ValueError(f"codebook_size={config.codebook_size}; use at least 2 codes per level")
    num_items = vectors.shape[0]
    if config.codebook_size ** config.levels < num_items:
        raise ValueError(
            f"codebook_size ** levels = {config.codebook_size}**{config.levels} = "
            f"{config.codebook_size ** config.levels} codes cannot name {num_items} items uniquely; "
            "raise codebook_size or levels"
        )
    if config.kmeans_iterations < 1:
        raise ValueError(f"kmeans_iterations={config.kmeans_iterations}; use at least 1")
    if config.seed < 0:
        raise ValueError(f"seed={config.seed}; use a non-negative integer")

    codes = np.zeros((num_items, config.levels), dtype=np.int64)  # [N, L]
    residuals = vectors.copy()  # [N, D]
    last_distances = np.zeros(num_items)  # [N] ||r_L - e_{L,c_L}||² at the last level
    for level in range(config.levels):
        rng = np.random.default_rng([config.seed, level])
        centroids, assignment = _kmeans(residuals, config.codebook_size, config.kmeans_iterations, rng)
        codes[:, level] = assignment
        residuals = residuals - centroids[assignment]  # [N, D]
        last_distances = (residuals * residuals).sum(1)

    resolution_rng = np.random.default_rng([config.seed, config.levels])
    resolved = _random_last_level(codes, last_distances, config.codebook_size, resolution_rng)
    collisions_left = _colliding_items(resolved)
    prefix_sizes = Counter(map(tuple, codes[:, :-1].tolist()))
    report: dict[str, Any] = {
        "num_items": num_items,
        "levels": config.levels,
        "codebook_size": config.codebook_size,
        "distinct_before": _distinct_fraction(codes),
        "colliding_items_before": _colliding_items(codes),
        "distinct_after": _distinct_fraction(resolved),
        "collisions_left": collisions_left,
        "max_items_per_prefix": max(prefix_sizes.values()),
        "codebook_usage": [np.unique(resolved[:, level]).size / config.codebook_size for level in range(config.levels)],
        "extra_level": False,
    }
    codebook_sizes = [config.codebook_size] * config.levels
    if collisions_left and config.full_prefix == "extra_level":
        resolved = _extra_level(resolved)
        codebook_sizes.append(int(resolved[:, -1].max()) + 1)
        report["extra_level"] = True
    report["distinct_final"] = _distinct_fraction(resolved)
    return SemanticIds(item_ids, resolved, codebook_sizes, report)


# --------------------------------------------------------------------------- tokenizer and model


def add_sid_tokens(tokenizer, model, semantic_ids: SemanticIds, seed: int = 0, noise_scale: float = 0.1) -> list[int]:
    """Add every SID token to `tokenizer` and grow `model`'s embeddings; returns the token ids [L*C] in
    ``semantic_ids.vocabulary()`` order (``add_vocabulary_tokens``)."""
    return add_vocabulary_tokens(tokenizer, model, semantic_ids.vocabulary(), seed, noise_scale)


def add_vocabulary_tokens(tokenizer, model, tokens: list[str], seed: int = 0,
                          noise_scale: float | None = 0.1) -> list[int]:
    """Add `tokens` to `tokenizer` (those it lacks) and grow `model`'s embeddings; returns their ids in order.

    Tokens are added as non-special ``AddedToken``s (matched whole, before BPE; kept by
    ``decode(..., skip_special_tokens=True)``).  Rows of newly added tokens in the input
    embedding (and in an untied output head) start at the mean of the existing rows plus
    Gaussian noise of ``noise_scale`` times the per-dimension standard deviation, from a
    generator seeded with `seed`; with ``noise_scale=None`` (and `seed` unused) they are left as
    they are: spare rows the checkpoint already has, and rows the model's own initialisation
    gives when the matrix grows (``resize_token_embeddings(mean_resizing=False)``, drawn from the
    global torch generator).  The embedding matrix is grown only when the tokenizer
    outgrows it (checkpoints often carry spare rows).  Both then round-trip through
    ``save_pretrained`` / ``from_pretrained``.  Idempotent: tokens already present keep
    their ids and rows.
    """
    from transformers import AddedToken

    if noise_scale is not None and noise_scale < 0:
        raise ValueError(f"noise_scale={noise_scale}; use 0 (every new row = the mean row) or a positive scale")
    existing = tokenizer.get_vocab()
    previous_length = len(tokenizer)
    new_tokens = list(dict.fromkeys(token for token in tokens if token not in existing))
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for token in new_tokens]
    )
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = torch.tensor(tokenizer.convert_tokens_to_ids(new_tokens), dtype=torch.long)  # [M]
    if new_ids.numel() == 0 or noise_scale is None:
        return token_ids
    generator = torch.Generator().manual_seed(seed)
    keep = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)  # [V'] rows to average
    keep[: min(previous_length, old_rows)] = True  # tokens the tokenizer had, not spare rows
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:  # [V', H]
            reference = weight[keep].float()  # [V_old, H]
            noise = torch.randn(new_ids.numel(), weight.shape[1], generator=generator)  # [M, H]
            rows = reference.mean(0) + noise_scale * reference.std(0) * noise  # [M, H]
            weight[new_ids] = rows.to(weight.dtype)
        if output is not None and getattr(output, "bias", None) is not None:
            output.bias[new_ids] = output.bias[keep[: output.bias.shape[0]]].mean()
    return token_ids
