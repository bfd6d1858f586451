"""MovieLens-100K: titles, RecBole split, dense training requests, leakage, integrity checks,
the data-directory lookup, loader errors, downloads (no network needed)."""

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from experiments.data import cache as download_cache
from experiments.data import load_recommendation_data
from experiments.data.common import DataError, resolve_data_dir
from experiments.data.movielens import (
    LIKED_RATING,
    Movie,
    MovieLensRatings,
    build_conversations,
    display_title,
    load_movielens,
    load_movielens_ratings,
    read_movielens_directory,
    recbole_split_sizes,
    training_cutoffs,
    user_timelines,
)
from rewards.catalog import Item
from rewards.lists import format_item

SHARED_DATA = Path(os.environ.get("RECRL_DATA_DIR") or "/nonexistent-recrl-data")
HAVE_MOVIELENS = (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file()
needs_movielens = pytest.mark.skipif(not HAVE_MOVIELENS, reason="ML-100K not found under $RECRL_DATA_DIR")


@pytest.fixture(scope="module")
def conversations():
    return load_movielens(SHARED_DATA, list_length=10, download=False, progress=False)


@pytest.fixture(scope="module")
def dense_conversations(conversations):
    return build_conversations(conversations.ratings, list_length=10, train_cuts_per_user=None)


@pytest.fixture
def no_data_environment(tmp_path, monkeypatch):
    """No $RECRL_DATA_DIR and an empty cache, whatever the user's environment holds."""
    monkeypatch.delenv("RECRL_DATA_DIR", raising=False)
    monkeypatch.delenv("RECRL_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home" / ".cache" / "recrl"


# ----------------------------------------------------------------------------- titles


@pytest.mark.parametrize(
    "raw, title",
    [
        ("Shawshank Redemption, The", "The Shawshank Redemption"),
        ("Fish Called Wanda, A", "A Fish Called Wanda"),
        ("Postino, Il", "Il Postino"),
        ("Misérables, Les", "Les Misérables"),
        ("Horseman on the Roof, The (Hussard sur le toit, Le)", "The Horseman on the Roof"),
        ("Seven (Se7en)", "Seven"),
        ("Toy Story (1995)", "Toy Story"),
        ("Corrina, Corrina", "Corrina, Corrina"),
    ],
)
def test_display_title(raw, title):
    assert display_title(raw)[0] == title


def test_recbole_split_sizes():
    assert recbole_split_sizes(20) == [16, 2, 2]
    assert recbole_split_sizes(25) == [21, 2, 2]
    assert recbole_split_sizes(737) == [591, 73, 73]
    assert recbole_split_sizes(5) == [3, 1, 1]  # shares 0.5 are raised to 1
    assert recbole_split_sizes(2) == [1, 0, 1]  # train keeps one
    for total in range(1, 400):
        sizes = recbole_split_sizes(total)
        assert sum(sizes) == total and min(sizes) >= 0


# ----------------------------------------------------------------------------- real data


@needs_movielens
def test_real_data_statistics(conversations):
    data = conversations
    assert data.statistics["users"] == 943 and data.statistics["interactions"] == 100000
    assert data.statistics["split_interactions"] == {"train": 80808, "val": 9596, "test": 9596}
    assert len(data.catalog) == 1663  # 1682 items, 18 duplicated (title, year) pairs, 1 without a year
    assert data.movies[64].item == Item("The Shawshank Redemption", 1994)
    assert data.movies[1412].year == 1995  # RecBole's year column says "V"
    assert data.movies[267].year is None


@needs_movielens
def test_deterministic(conversations):
    again = load_movielens(SHARED_DATA, list_length=10, download=False, progress=False)
    for first, second in ((conversations.train, again.train), (conversations.test, again.test)):
        assert [example.id for example in first] == [example.id for example in second]
        assert [example.messages for example in first] == [example.messages for example in second]


@needs_movielens
def test_split_has_no_leakage(conversations):
    timelines = {timeline.user_id: timeline for timeline in conversations.timelines}
    by_user: dict[int, list] = {}
    for example in conversations.train + conversations.val:
        by_user.setdefault(example.user_id, []).append(example)
    for example in conversations.test:
        timeline = timelines[example.user_id]
        # the test history is exactly the user's train + val interactions
        assert example.history_item_ids == timeline.item_ids[: timeline.val_end]
        assert example.seen_item_ids == timeline.item_ids[: timeline.val_end]
        assert set(example.groundtruth_item_ids) <= set(timeline.item_ids[timeline.val_end:])
    for user, examples in by_user.items():
        timeline = timelines[user]
        test_ids = set(timeline.item_ids[timeline.val_end:])
        test_lines = {format_item(conversations.item_of(item_id)) for item_id in test_ids
                      if conversations.recommendable(item_id)}
        for example in examples:
            assert not test_ids & set(example.history_item_ids)
            assert not test_ids & set(example.groundtruth_item_ids)
            assert not test_ids & set(example.seen_item_ids)
            history_lines = {format_item(conversations.item_of(item_id)) for item_id in example.history_item_ids
                             if conversations.recommendable(item_id)}
            # a test movie is named in the prompt only as a same-titled twin id from the history
            assert not (test_lines - history_lines) & set(example.prompt_text.split("\n"))
            if example.split == "train":
                assert example.cutoff + len(timeline.item_ids[example.cutoff:]) > 0
                assert set(example.groundtruth_item_ids) <= set(timeline.item_ids[example.cutoff:timeline.train_end])
            else:
                assert example.history_item_ids == timeline.item_ids[: timeline.train_end]


@needs_movielens
def test_example_contents(conversations):
    example = conversations.test[0]
    assert example.groundtruth == [conversations.item_of(item_id) for item_id in example.groundtruth_item_ids]
    assert "one movie per line in the form Title (Year)" in example.prompt_text
    assert "Recommend 10 other movies" in example.prompt_text
    for item in example.groundtruth:
        assert item in conversations.catalog and item not in example.seen
    shown = example.prompt_text.split(":\n", 1)[1].split("\n\n", 1)[0].split("\n")
    assert 1 <= len(shown) <= 10


@needs_movielens
def test_load_recommendation_data_movielens(monkeypatch):
    monkeypatch.setenv("RECRL_DATA_DIR", str(SHARED_DATA))
    data = load_recommendation_data(list_length=20, verbose=False)
    assert data.source == "movielens-100k" and data.list_length == 20
    assert "Recommend 20 other movies" in data.test[0].prompt_text
    assert resolve_data_dir(None) == SHARED_DATA
    folder = SHARED_DATA / "ml-100k"
    assert data.fingerprint == reference_fingerprint(folder, ["ml-100k.inter", "ml-100k.item", "ml-100k.user"])
    assert data.statistics["files"] == f"{folder} (recbole)" and data.statistics["fingerprint"] == data.fingerprint
    assert all(example.demonstration is None for example in data.train)  # the caller attaches teacher lists


# ----------------------------------------------------------------------------- dense training requests


def synthetic_ratings(timeline_ratings: dict[int, list[float]], no_year=()) -> MovieLensRatings:
    """User u rates items 1, 2, ... in this order (one second apart); item i is "Movie i (1990+i)"."""
    users, items, ratings, times = [], [], [], []
    for user, values in timeline_ratings.items():
        for position, rating in enumerate(values):
            users.append(user), items.append(position + 1), ratings.append(rating), times.append(1000 + position)
    movies = {item_id: Movie(item_id, f"Movie {item_id}", None if item_id in no_year else 1990 + item_id,
                             f"Movie {item_id}") for item_id in range(1, max(items) + 1)}
    return MovieLensRatings(np.array(users), np.array(items), np.array(ratings, dtype=np.float32), np.array(times),
                            movies, {}, Path("synthetic"), "recbole")


# 20 interactions: train = positions 0..15, val = 16..17, test = 18..19 (RecBole 16/2/2), window = 2
HAND_TIMELINE = [5, 3, 4, 2, 1, 3, 5, 2, 2, 4, 3, 3, 2, 1, 4, 2, 3, 5, 4, 5]


def test_dense_training_requests_hand_checked():
    ratings = synthetic_ratings({7: HAND_TIMELINE})
    (timeline,) = user_timelines(ratings)
    assert training_cutoffs(timeline, None, min_history=5) == [(cutoff, cutoff + 2) for cutoff in range(5, 15)]
    assert training_cutoffs(timeline, 0, min_history=5) == []
    with pytest.raises(ValueError, match="train_cuts_per_user"):
        training_cutoffs(timeline, -1, min_history=5)
    dense = build_conversations(ratings, list_length=3, train_cuts_per_user=None)
    # windows (positions c, c+1) with a rating >= 4: c = 5, 6 -> item 7; 8, 9 -> item 10; 13, 14 -> item 15
    assert [example.cutoff for example in dense.train] == [5, 6, 8, 9, 13, 14]
    assert [example.groundtruth_item_ids for example in dense.train] == [[7], [7], [10], [10], [15], [15]]
    assert dense.train[0].id == "ml-100k/train/user-7/cut-5"
    assert dense.train[0].history_item_ids == [1, 2, 3, 4, 5]
    assert "Movie 1 (1991)\nMovie 3 (1993)\n" in dense.train[0].prompt_text  # the liked history
    assert [example.groundtruth_item_ids for example in dense.val] == [[18]]
    assert [example.groundtruth_item_ids for example in dense.test] == [[19, 20]]
    sparse = build_conversations(ratings, list_length=3, train_cuts_per_user=3)
    assert repr(sparse.val) == repr(dense.val) and repr(sparse.test) == repr(dense.test)


def reference_dense_count(conversations, min_history: int = 5) -> int:
    """Training requests of the dense mode, counted from the timelines with plain loops."""
    count = 0
    for timeline in conversations.timelines:
        window = max(1, timeline.num_test)
        for cutoff in range(max(1, min(min_history, timeline.num_train - window)), timeline.num_train - window + 1):
            shows_something = any(conversations.recommendable(item) for item in timeline.item_ids[:cutoff])
            liked_ahead = any(rating >= LIKED_RATING and conversations.recommendable(item) for item, rating in
                              zip(timeline.item_ids[cutoff:cutoff + window], timeline.ratings[cutoff:cutoff + window]))
            count += shows_something and liked_ahead
    return count


@needs_movielens
def test_dense_training_requests_on_ml100k(conversations, dense_conversations):
    dense = dense_conversations
    assert len(conversations.train) == 2584 and len(conversations.val) == 854 and len(conversations.test) == 833
    assert len(dense.train) == reference_dense_count(conversations)
    assert len(dense.train) > 20 * len(conversations.train)
    # validation and test requests are byte-identical in both modes
    assert repr(dense.val) == repr(conversations.val) and repr(dense.test) == repr(conversations.test)
    # no training target or history outside the train part
    timelines = {timeline.user_id: timeline for timeline in dense.timelines}
    for example in dense.train:
        timeline = timelines[example.user_id]
        window_end = example.cutoff + max(1, timeline.num_test)
        assert window_end <= timeline.train_end
        assert example.history_item_ids == timeline.item_ids[:example.cutoff]
        assert example.groundtruth_item_ids == [
            item for item, rating in zip(timeline.item_ids[example.cutoff:window_end],
                                         timeline.ratings[example.cutoff:window_end])
            if rating >= LIKED_RATING and conversations.recommendable(item)]
    ids = [example.id for example in dense.train]
    assert len(set(ids)) == len(ids)


@needs_movielens
def test_dense_training_requests_are_deterministic(conversations, dense_conversations):
    again = build_conversations(conversations.ratings, list_length=10, train_cuts_per_user=None)
    assert [example.id for example in again.train] == [example.id for example in dense_conversations.train]
    assert [example.messages for example in again.train] == [example.messages for example in dense_conversations.train]
    assert [example.groundtruth for example in again.train] == [example.groundtruth
                                                                for example in dense_conversations.train]


# ----------------------------------------------------------------------------- loader errors


def write_recbole(folder: Path, inter: str, item: str = "item_id:token\tmovie_title:token_seq\trelease_year:token\n"
                  "1\tHeat\t1995\n2\tUp\t2009\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.inter").write_text(inter)
    (folder / "ml-100k.item").write_text(item)
    return folder


HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_loader_reads_small_recbole_files(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\t10\n1\t2\t4\t5\n")
    ratings = read_movielens_directory(folder, verify=False)
    assert ratings.num_interactions == 2 and ratings.file_format == "recbole"


def test_loader_malformed_number_names_file_and_line(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\t10\n1\tabc\t4\t5\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter:3: column 'item_id'"):
        read_movielens_directory(folder, verify=False)


def test_loader_wrong_columns_names_file_and_line(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter:2: expected 4"):
        read_movielens_directory(folder, verify=False)


def test_loader_wrong_header(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", "user\titem\trating\ttime\n1\t1\t5\t10\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter:1: header"):
        read_movielens_directory(folder, verify=False)


def test_loader_bad_item_file(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\t10\n",
                           "item_id:token\tmovie_title:token_seq\trelease_year:token\n1\tHeat\n")
    with pytest.raises(DataError, match=r"ml-100k\.item:2: expected 3"):
        read_movielens_directory(folder, verify=False)


def test_loader_unknown_item(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t7\t5\t10\n")
    with pytest.raises(DataError, match="item ids missing from the item file"):
        read_movielens_directory(folder, verify=False)


def test_loader_missing_partner_file(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "ml-100k.inter").write_text(HEADER)
    with pytest.raises(DataError, match=r"ml-100k\.item: missing"):
        read_movielens_directory(folder, verify=False)


def test_missing_data_without_download_says_where_to_put_files(no_data_environment):
    with pytest.raises(DataError, match=r"not found.*ml-100k\.inter.*RECRL_DATA_DIR") as error:
        load_movielens_ratings(None, download=False)
    assert "\n" not in str(error.value) and str(no_data_environment / "ml-100k") in str(error.value)


def go_offline(monkeypatch):
    def offline(*arguments, **keywords):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(download_cache, "fetch_from_grouplens", offline)
    monkeypatch.setattr(download_cache, "fetch_from_recbole_wheel", offline)


def test_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(download_cache.MovieLensDownloadError, match=r"Fix: put.*u\.data.*network unreachable") as error:
        download_cache.download_movielens_100k(tmp_path, progress=False)
    assert isinstance(error.value, DataError) and "\n" not in str(error.value)


def test_offline_download_is_a_data_error_that_says_where_it_fetches(no_data_environment, monkeypatch, capsys):
    go_offline(monkeypatch)
    with pytest.raises(DataError, match="could not be downloaded"):
        load_movielens_ratings(None, progress=False)
    announced = capsys.readouterr().err
    assert f"downloading it into {no_data_environment / 'ml-100k'}" in announced
    assert "GroupLens archive failed: <urlopen error network unreachable>" in announced


def test_download_announces_source_and_destination(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for member in download_cache.GROUPLENS_MEMBERS:
            bundle.writestr(member, "x")

    def fake_download(url, destination, timeout_seconds=30.0, progress=True):
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(archive.read_bytes())
        return destination

    monkeypatch.setattr(download_cache, "download_url", fake_download)
    monkeypatch.setattr(download_cache, "GROUPLENS_ZIP_MD5", download_cache.file_digest(archive, "md5"))
    target = download_cache.fetch_from_grouplens(tmp_path / "cache", progress=False)
    announced = capsys.readouterr().err
    destination = tmp_path / "cache" / "downloads" / "ml-100k.zip"
    assert f"downloading {download_cache.GROUPLENS_ZIP_URL} -> {destination}" in announced
    assert f"-> {target}" in announced and (target / "u.data").read_text() == "x"
    assert not list((tmp_path / "cache").glob("ml-100k.tmp-*"))  # extracted aside, then renamed into place whole


def test_a_second_download_waits_for_the_first_one(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys\nfrom experiments.data.cache import download_lock\n"
         "with download_lock(pathlib.Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.readline()",
         str(tmp_path)], cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        acquired = threading.Event()

        def take_the_lock():
            with download_cache.download_lock(tmp_path):
                acquired.set()

        waiter = threading.Thread(target=take_the_lock)
        waiter.start()
        assert not acquired.wait(0.5)  # blocked while the other process downloads
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert acquired.wait(60)  # and through as soon as it is done
        waiter.join()
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- data-directory lookup


def test_explicit_data_dir_without_data_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    # the environment and the cache both hold a (small) ML-100K; an explicit empty folder must not fall back to them
    small = tmp_path / "elsewhere"
    write_recbole(small / "ml-100k", HEADER + "1\t1\t5\t10\n")
    monkeypatch.setenv("RECRL_DATA_DIR", str(small))
    monkeypatch.setenv("RECRL_CACHE_DIR", str(small))
    empty = tmp_path / "empty"
    empty.mkdir()
    for load in (lambda: load_movielens_ratings(empty, verify=False),
                 lambda: load_recommendation_data(empty, verbose=False, verify=False)):
        with pytest.raises(DataError, match=r"holds no .*ml-100k/ml-100k\.inter.*u\.data") as error:
            load()
        assert str(empty) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError, match="does not exist"):
        load_movielens_ratings(tmp_path / "missing", verify=False)
    # without an explicit folder the environment is used
    assert load_movielens_ratings(None, verify=False).directory == small / "ml-100k"


def test_partial_layout_names_the_missing_file(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t1\t5\t10\n")
    with pytest.raises(DataError, match=r"u\.item: missing"):
        load_movielens_ratings(tmp_path, verify=False)


# ----------------------------------------------------------------------------- integrity


def test_small_files_fail_verification_naming_file_and_counts(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\t10\n1\t2\t4\t5\n")
    with pytest.raises(DataError) as error:
        read_movielens_directory(folder)
    message = str(error.value)
    assert str(folder / "ml-100k.inter") in message
    assert "found 2 ratings, 1 users, 2 items" in message
    assert "MovieLens-100K has 100,000 ratings, 943 users, 1,682 items" in message
    assert f"delete {folder}" in message and download_cache.RECBOLE_FILE_SHA256["ml-100k.inter"] in message
    assert "\n" not in message


def test_incomplete_cache_says_delete_and_download_again(tmp_path, monkeypatch):
    monkeypatch.delenv("RECRL_DATA_DIR", raising=False)
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_recbole(tmp_path / "cache" / "ml-100k", HEADER + "1\t1\t5\t10\n")
    with pytest.raises(DataError, match="Fix: delete " + re.escape(str(folder)) + " and run again with network access"):
        load_movielens_ratings(None)


@needs_movielens
def test_truncated_files_are_rejected(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    inter_lines = (SHARED_DATA / "ml-100k" / "ml-100k.inter").read_text().splitlines(keepends=True)
    item_lines = (SHARED_DATA / "ml-100k" / "ml-100k.item").read_text().splitlines(keepends=True)
    (folder / "ml-100k.inter").write_text("".join(inter_lines[:80_001]))  # header + 80,000 ratings
    (folder / "ml-100k.item").write_text("".join(item_lines))
    with pytest.raises(DataError, match=r"ml-100k\.inter: found 80,000 ratings.*has 100,000 ratings"):
        load_movielens(tmp_path, download=False, progress=False)
    (folder / "ml-100k.inter").write_text("".join(inter_lines))
    (folder / "ml-100k.item").write_text("".join(item_lines[:1000]))  # header + 999 items
    with pytest.raises(DataError, match=r"ml-100k\.item: found 999 items, but MovieLens-100K has 1,682 items"):
        load_movielens(tmp_path, download=False, progress=False)


def reference_fingerprint(folder: Path, names) -> str:
    lines = "".join(f"{name}\t{hashlib.sha256((folder / name).read_bytes()).hexdigest()}\n" for name in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_fingerprint_covers_the_files_read(tmp_path):
    folder = write_recbole(tmp_path / "a" / "ml-100k", HEADER + "1\t1\t5\t10\n1\t2\t4\t11\n")
    data = load_recommendation_data(tmp_path / "a", source="movielens-100k", verbose=False, verify=False)
    assert data.fingerprint == reference_fingerprint(folder, ["ml-100k.inter", "ml-100k.item"])
    moved = write_recbole(tmp_path / "b" / "ml-100k", HEADER + "1\t1\t5\t10\n1\t2\t4\t11\n")
    assert load_recommendation_data(tmp_path / "b", verbose=False, verify=False).fingerprint == data.fingerprint
    (moved / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                        "1\t24\tM\ttechnician\t85711\n")
    changed = load_recommendation_data(tmp_path / "b", verbose=False, verify=False)
    assert changed.fingerprint == reference_fingerprint(moved, ["ml-100k.inter", "ml-100k.item", "ml-100k.user"])
    assert changed.fingerprint != data.fingerprint


def test_reddit_fingerprint(tmp_path):
    folder = tmp_path / "reddit-v2"
    folder.mkdir()
    record = {"prompt": [{"role": "user", "content": "like Alien?"}],
              "groundtruth_with_release_year": [["Aliens", "1986"]], "seen_titles": ["Alien"]}
    for stem in ("train", "validation", "test"):
        (folder / f"{stem}.jsonl").write_text(json.dumps(record) + "\n")
    (folder / "catalog.tsv").write_text("title\tyear\nAliens\t1986\n")
    data = load_recommendation_data(tmp_path, verbose=False)
    assert data.source == "reddit-v2"
    assert data.fingerprint == reference_fingerprint(
        folder, ["catalog.tsv", "test.jsonl", "train.jsonl", "validation.jsonl"])


def test_data_package_does_not_import_baselines():
    package = Path(__file__).resolve().parents[1] / "experiments" / "data"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any("baselines" in name for name in names), f"{path.name} imports {names}"


def test_grouplens_format(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t4\t881250951\n")
    (folder / "u.item").write_bytes(
        "1|Shawshank Redemption, The (1994)|01-Jan-1994||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
        "2|Amélie (2001)|01-Jan-2001||http://x|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n".encode("latin-1"))
    ratings = read_movielens_directory(folder, verify=False)
    assert ratings.file_format == "grouplens"
    assert ratings.movies[1].item == Item("The Shawshank Redemption", 1994)
    assert ratings.movies[1].genres == ("Drama",)
    assert ratings.movies[2].item == Item("Amélie", 2001)
    (folder / "u.data").write_text("1\t1\t5\n")
    with pytest.raises(DataError, match=r"u\.data:1: expected 4"):
        read_movielens_directory(folder, verify=False)


def fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(download_cache.RECBOLE_DATASET_PREFIX + name, data)
    return path


def test_recbole_wheel_extraction_verifies_checksums(tmp_path, monkeypatch):
    files = {
        "ml-100k.inter": (HEADER + "1\t1\t5\t10\n1\t2\t4\t11\n").encode(),
        "ml-100k.item": b"item_id:token\tmovie_title:token_seq\trelease_year:token\n1\tHeat\t1995\n2\tUp\t2009\n",
    }
    wheel = fake_wheel(tmp_path / "recbole.whl", files)
    monkeypatch.setattr(download_cache, "RECBOLE_WHEEL_SHA256", download_cache.file_digest(wheel))
    monkeypatch.setattr(download_cache, "RECBOLE_FILE_SHA256",
                        {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    folder = download_cache.extract_recbole_wheel(wheel, tmp_path / "cache", progress=False)
    assert read_movielens_directory(folder, verify=False).num_interactions == 2
    monkeypatch.setattr(download_cache, "RECBOLE_FILE_SHA256", {"ml-100k.inter": "0" * 64})
    with pytest.raises(download_cache.ChecksumError, match="ml-100k.inter: sha256"):
        download_cache.extract_recbole_wheel(wheel, tmp_path / "cache2", progress=False)
    monkeypatch.setattr(download_cache, "RECBOLE_WHEEL_SHA256", "0" * 64)
    with pytest.raises(download_cache.ChecksumError, match="recbole.whl"):
        download_cache.extract_recbole_wheel(wheel, tmp_path / "cache3", progress=False)


def test_small_conversations_are_built(tmp_path):
    lines = [HEADER.rstrip("\n")]
    items = "item_id:token\tmovie_title:token_seq\trelease_year:token\n" + "".join(
        f"{index}\tMovie {index}\t{1990 + index}\n" for index in range(1, 31))
    for user in (1, 2):
        for step in range(30):
            lines.append(f"{user}\t{(step + user) % 30 + 1}\t{5 if step % 2 else 3}\t{1000 + step}")
    folder = write_recbole(tmp_path / "ml-100k", "\n".join(lines) + "\n", items)
    data = build_conversations(read_movielens_directory(folder, verify=False), list_length=5)
    assert len(data.test) == 2 and len(data.val) == 2 and data.train
    for example in data.test:
        assert len(example.history_item_ids) == 27
