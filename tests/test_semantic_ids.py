"""Semantic IDs: TF-IDF + SVD vectors against numpy references, residual k-means codes, random-last-level
collision resolution, JSON round trip, and SID tokens in a tiny tokenizer/model."""

import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.semantic_ids import (
    SemanticIdConfig,
    SemanticIds,
    add_sid_tokens,
    build_semantic_ids,
    sid_token,
    text_vectors,
)
from models.tiny import train_tokenizer
from tests.conftest import CORPUS, make_model

SID_PATTERN = re.compile(r"^<a_\d+><b_\d+><c_\d+>$")


# --------------------------------------------------------------------------- independent references


def reference_tfidf(texts):
    """Dense TF-IDF [N, V] written out directly: (1 + ln tf) * (ln((1+N)/(1+df)) + 1), rows L2-normalised."""
    documents = []
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        documents.append(Counter(words + [a + " " + b for a, b in zip(words, words[1:])]))
    vocabulary = sorted(set().union(*documents))
    n = len(texts)
    df = {term: sum(term in doc for doc in documents) for term in vocabulary}
    matrix = np.zeros((n, len(vocabulary)))
    for i, doc in enumerate(documents):
        for j, term in enumerate(vocabulary):
            if doc[term]:
                matrix[i, j] = (1 + math.log(doc[term])) * (math.log((1 + n) / (1 + df[term])) + 1)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def reference_lsa(matrix, dim):
    """U S of an exact SVD, each column's largest-|U| entry made positive."""
    u, s, _ = np.linalg.svd(matrix, full_matrices=False)
    u = u[:, :dim]
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(dim)])
    return u * signs * s[:dim]


def clustered_points(num_points=1682, num_clusters=24, dim=32, seed=0):
    """Gaussian blobs of different widths: a stand-in for item embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim)) * 3.0
    labels = rng.integers(num_clusters, size=num_points)
    widths = rng.uniform(0.3, 1.5, size=num_clusters)
    return centres[labels] + rng.normal(size=(num_points, dim)) * widths[labels, None]


def unique_item_fraction(codes):
    """Fraction of items whose code row no other item has."""
    counts = Counter(map(tuple, codes.tolist()))
    return sum(counts[tuple(row)] == 1 for row in codes.tolist()) / len(codes)


# --------------------------------------------------------------------------- text vectors

SMALL_CORPUS = [
    "Toy Story 1995 Animation Children's Comedy",
    "GoldenEye 1995 Action Adventure Thriller",
    "Four Rooms 1995 Thriller",
    "Get Shorty 1995 Action Comedy Drama",
    "Copycat 1995 Crime Drama Thriller",
    "Twelve Monkeys 1995 Drama Sci-Fi",
    "Babe 1995 Children's Comedy Drama",
    "Dead Man Walking 1995 Drama",
]


def test_text_vectors_match_exact_svd_of_reference_tfidf():
    # Width = min(dim + 10, N, V) = N here, so the randomised range finder spans every column: exact.
    vectors = text_vectors(SMALL_CORPUS, dim=3, seed=0)
    expected = reference_lsa(reference_tfidf(SMALL_CORPUS), 3)
    assert vectors.shape == (8, 3)
    np.testing.assert_allclose(vectors, expected, atol=1e-10)


def test_text_vectors_truncated_randomised_svd_is_close_to_exact():
    texts = [f"{a} {b} {c}" for a in ("red", "blue", "green", "gold") for b in ("fast", "slow", "tall")
             for c in ("film", "show", "book", "song")]  # 48 texts, width dim + 10 = 12 < 48
    vectors = text_vectors(texts, dim=2, seed=3)
    expected = reference_lsa(reference_tfidf(texts), 2)
    # Column norms of U S are the singular values; 4 power iterations bring them within ~1e-5 here
    # (Halko et al.'s bound shrinks with (s_13 / s_2) ** 9).
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), np.linalg.norm(expected, axis=0), rtol=1e-4)


def test_text_vectors_are_deterministic_under_a_seed():
    texts = SMALL_CORPUS * 3 + [f"movie number {i}" for i in range(30)]
    first = text_vectors(texts, dim=4, seed=7)
    np.testing.assert_array_equal(first, text_vectors(texts, dim=4, seed=7))


@pytest.mark.parametrize("texts, dim, message", [
    ([], 2, "texts is empty"),
    (["Heat 1995 Crime", "  ", "Fargo 1996"], 2, r"texts \[1\] have no word characters"),
    (["Heat 1995", "Fargo 1996"], 3, "dim=3 must be between 1 and"),
])
def test_text_vectors_bad_inputs(texts, dim, message):
    with pytest.raises(ValueError, match=message):
        text_vectors(texts, dim=dim, seed=0)


# --------------------------------------------------------------------------- residual k-means codes


def test_default_settings_give_unique_sids_on_clustered_data():
    points = clustered_points()
    ids = build_semantic_ids(points, list(range(len(points))))
    assert ids.codes.shape == (1682, 3)
    assert unique_item_fraction(ids.codes) >= 0.99
    report = ids.report
    # The report's numbers, recomputed from the codes.
    assert report["distinct_final"] == len(set(map(tuple, ids.codes.tolist()))) / 1682
    for level in range(3):
        assert report["codebook_usage"][level] == len(np.unique(ids.codes[:, level])) / 64
    assert 0 <= report["collisions_left"] <= report["colliding_items_before"]


def test_first_level_recovers_well_separated_clusters():
    rng = np.random.default_rng(1)
    centres = np.array([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    labels = np.repeat(np.arange(4), 25)
    points = centres[labels] + rng.normal(scale=0.1, size=(100, 2))
    ids = build_semantic_ids(points, list(range(100)), SemanticIdConfig(levels=4, codebook_size=4))
    first = ids.codes[:, 0]
    # Same partition as the blobs, up to renaming the codes.
    assert {(int(label), int(code)) for label, code in zip(labels, first)} == {
        (label, int(first[label * 25])) for label in range(4)}
    assert len(set(first.tolist())) == 4


def test_codes_are_deterministic_and_depend_on_the_seed():
    points = clustered_points(num_points=400, seed=2)
    config = SemanticIdConfig(levels=3, codebook_size=16, seed=5)
    first = build_semantic_ids(points, list(range(400)), config)
    again = build_semantic_ids(points, list(range(400)), config)
    other = build_semantic_ids(points, list(range(400)), SemanticIdConfig(levels=3, codebook_size=16, seed=6))
    np.testing.assert_array_equal(first.codes, again.codes)
    assert not np.array_equal(first.codes, other.codes)


def test_random_last_level_resolves_duplicates_under_the_same_prefix():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(20, 4)) * 5.0
    points = np.concatenate([distinct, np.repeat(distinct[:1], 4, axis=0)])  # item 0 plus 4 exact copies
    config = SemanticIdConfig(levels=2, codebook_size=16, seed=1)
    ids = build_semantic_ids(points, [f"item{i}" for i in range(24)], config)
    copies = [0, 20, 21, 22, 23]
    assert ids.report["colliding_items_before"] >= 5
    assert ids.report["collisions_left"] == 0 and not ids.report["extra_level"]
    assert len({ids.sid_of(f"item{i}") for i in copies}) == 5
    assert len(set(ids.codes[copies, 0].tolist())) == 1  # the prefix is kept, only the last level moves
    assert unique_item_fraction(ids.codes) == 1.0


@pytest.mark.parametrize("policy", ["extra_level", "report"])
def test_prefix_with_more_items_than_codes(policy):
    # 10 identical items under one prefix, C = 4: the keeper + 3 moved items are unique, 6 still share the
    # keeper's code, so 7 items collide.
    points = np.zeros((10, 3))
    ids = build_semantic_ids(points, list(range(10)), SemanticIdConfig(levels=2, codebook_size=4, full_prefix=policy))
    assert ids.report["collisions_left"] == 7
    assert ids.report["distinct_after"] == 4 / 10
    if policy == "extra_level":
        assert ids.report["extra_level"] and ids.levels == 3 and ids.codebook_sizes == [4, 4, 7]
        assert unique_item_fraction(ids.codes) == 1.0
        assert all(ids.item_of(ids.sid_of(item)) == item for item in range(10))
    else:
        assert ids.levels == 2
        shared = Counter(ids.sids).most_common(1)[0][0]
        with pytest.raises(KeyError, match="is shared by items"):
            ids.item_of(shared)


def test_round_trip_item_sid_item_and_json(tmp_path):
    points = clustered_points(num_points=300, seed=4)
    items = [1000 + i for i in range(300)]
    ids = build_semantic_ids(points, items, SemanticIdConfig(levels=3, codebook_size=32))
    assert not ids.report["extra_level"]
    for item, row in zip(items, ids.codes):
        sid = ids.sid_of(item)
        assert SID_PATTERN.match(sid)
        assert sid == f"<a_{row[0]}><b_{row[1]}><c_{row[2]}>"
        assert ids.item_of(sid) == item
        assert ids.item_of(" ".join([sid[: sid.index("<b")], sid[sid.index("<b"):]])) == item  # whitespace ignored
    path = tmp_path / "sids.json"
    ids.save(path)
    loaded = SemanticIds.load(path)
    assert loaded.item_ids == items and loaded.sids == ids.sids and loaded.report == ids.report
    np.testing.assert_array_equal(loaded.codes, ids.codes)
    assert ids.vocabulary()[:2] == ["<a_0>", "<a_1>"] and len(ids.vocabulary()) == 96
    with pytest.raises(KeyError, match="has no semantic ID"):
        ids.sid_of(5)
    with pytest.raises(KeyError, match="is not the semantic ID"):
        ids.item_of("<a_99><b_0><c_0>")


def test_load_rejects_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"codes": []}')
    with pytest.raises(ValueError, match="not a semantic-ID file"):
        SemanticIds.load(path)


@pytest.mark.parametrize("points, items, config, message", [
    (np.zeros((5, 2)), [1, 2, 3, 3, 4], SemanticIdConfig(), r"item ids \[3\] appear more than once"),
    (np.zeros((5, 2)), [1, 2, 3], SemanticIdConfig(), "3 item ids for 5 vectors"),
    (np.zeros((0, 2)), [], SemanticIdConfig(), "non-empty"),
    (np.full((2, 2), np.nan), [1, 2], SemanticIdConfig(), "NaN"),
    (np.zeros((30, 2)), list(range(30)), SemanticIdConfig(levels=2, codebook_size=5),
     r"5\*\*2 = 25 codes cannot name 30"),
    (np.zeros((3, 2)), [1, 2, 3], SemanticIdConfig(codebook_size=1), "at least 2 codes"),
    (np.zeros((3, 2)), [1, 2, 3], SemanticIdConfig(full_prefix="drop"), "full_prefix='drop'"),
])
def test_build_bad_inputs(points, items, config, message):
    with pytest.raises(ValueError, match=message):
        build_semantic_ids(points, items, config)


def test_sid_token_names():
    assert sid_token(0, 12) == "<a_12>" and sid_token(3, 0) == "<d_0>"
    with pytest.raises(ValueError, match="level 26"):
        sid_token(26, 0)


# --------------------------------------------------------------------------- tokenizer and model


def small_semantic_ids():
    codes = np.array([[0, 1, 2], [3, 1, 0], [0, 1, 3], [2, 2, 2]])
    return SemanticIds(["m1", "m2", "m3", "m4"], codes, [4, 4, 4])


@pytest.mark.parametrize("tie", [True, False])
def test_add_sid_tokens_single_ids_forward_and_round_trip(tmp_path, tie):
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)  # own copy: the session tokenizer must not change
    model = make_model(tokenizer, "qwen2", tie=tie)
    old_vocab = len(tokenizer)
    old_input = model.get_input_embeddings().weight.detach().clone()  # [V, H]
    old_output = model.get_output_embeddings().weight.detach().clone()
    ids = small_semantic_ids()

    token_ids = add_sid_tokens(tokenizer, model, ids, seed=0)
    assert len(tokenizer) == old_vocab + 12 and token_ids == list(range(old_vocab, old_vocab + 12))
    for token, token_id in zip(ids.vocabulary(), token_ids):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    text = "Ranking:\n" + ids.sid_of("m2") + "\n" + ids.sid_of("m4")
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert encoded[-7:] == [token_ids[3], token_ids[5], token_ids[8], tokenizer.convert_tokens_to_ids("Ċ"),
                            token_ids[2], token_ids[6], token_ids[10]]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text  # not dropped as special tokens

    embedding = model.get_input_embeddings().weight  # [V + 12, H]
    assert embedding.shape == (old_vocab + 12, old_input.shape[1]) and model.config.vocab_size == old_vocab + 12
    assert torch.equal(embedding[:old_vocab], old_input)
    new_rows = embedding[old_vocab:]
    # Mean of the old rows plus small noise (0.1 x per-dimension std).
    deviation = (new_rows - old_input.mean(0)) / old_input.std(0)
    assert deviation.abs().max() < 0.1 * 6 and deviation.abs().mean() > 0.01
    if not tie:
        output = model.get_output_embeddings().weight
        assert torch.equal(output[:old_vocab], old_output)
        assert ((output[old_vocab:] - old_output.mean(0)) / old_output.std(0)).abs().max() < 0.6
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded])).logits  # [1, T, V + 12]
    assert logits.shape == (1, len(encoded), old_vocab + 12) and torch.isfinite(logits).all()

    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded_tokenizer(text, add_special_tokens=False).input_ids == encoded
    reloaded_state = reloaded_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded_state[name], tensor), name


def test_add_sid_tokens_mean_rows_and_idempotent():
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    model = make_model(tokenizer, "llama", tie=False)
    old_input = model.get_input_embeddings().weight.detach().clone()
    ids = small_semantic_ids()
    first = add_sid_tokens(tokenizer, model, ids, noise_scale=0.0)
    new_rows = model.get_input_embeddings().weight[first]  # [12, H]
    torch.testing.assert_close(new_rows, old_input.mean(0).expand(12, -1), rtol=0, atol=1e-6)
    weights = model.get_input_embeddings().weight.detach().clone()
    assert add_sid_tokens(tokenizer, model, ids) == first  # nothing new: same ids, weights untouched
    assert torch.equal(model.get_input_embeddings().weight, weights)


# --------------------------------------------------------------------------- real ML-100K items


def movielens_item_file():
    data_dir = os.environ.get("RECRL_DATA_DIR")
    path = Path(data_dir) / "ml-100k" / "ml-100k.item" if data_dir else None
    return path if path is not None and path.is_file() else None


@pytest.mark.skipif(movielens_item_file() is None, reason="set RECRL_DATA_DIR to a folder with ml-100k/ml-100k.item")
def test_movielens_titles_and_genres_get_unique_sids():
    from experiments.data.movielens import read_recbole_items

    movies = read_recbole_items(movielens_item_file())
    items = sorted(movies)
    texts = [f"{movies[i].raw_title} {movies[i].year or ''} {' '.join(movies[i].genres)}" for i in items]
    ids = build_semantic_ids(text_vectors(texts, dim=64, seed=0), items)
    assert len(items) == 1682 and ids.levels == 3
    assert unique_item_fraction(ids.codes) >= 0.99
    assert all(ids.item_of(ids.sid_of(item)) == item for item in items)
