"""MovieLens-100K: titles, RecBole split, leakage, loader errors, downloads (no network needed)."""

import hashlib
import time
import urllib.error
import zipfile
from pathlib import Path

import pytest

from experiments.data import cache as download_cache
from experiments.data import load_recommendation_data
from experiments.data.common import DataError, resolve_data_dir
from experiments.data.movielens import (
    build_conversations,
    display_title,
    load_movielens,
    load_movielens_ratings,
    read_movielens_directory,
    recbole_split_sizes,
)
from rewards.catalog import Item
from rewards.lists import format_item

SHARED_DATA = Path("/work/shared/data")
HAVE_MOVIELENS = (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file()
needs_movielens = pytest.mark.skipif(not HAVE_MOVIELENS, reason="ML-100K not available at /work/shared/data")


@pytest.fixture(scope="module")
def conversations():
    return load_movielens(SHARED_DATA, list_length=10, download=False, progress=False)


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
def test_real_data_statistics_and_speed():
    started = time.perf_counter()
    data = load_movielens(SHARED_DATA, download=False, progress=False)
    assert time.perf_counter() - started < 2.0
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
    ratings = read_movielens_directory(folder)
    assert ratings.num_interactions == 2 and ratings.file_format == "recbole"


def test_loader_malformed_number_names_file_and_line(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\t10\n1\tabc\t4\t5\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter:3: column 'item_id'"):
        read_movielens_directory(folder)


def test_loader_wrong_columns_names_file_and_line(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter:2: expected 4"):
        read_movielens_directory(folder)


def test_loader_wrong_header(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", "user\titem\trating\ttime\n1\t1\t5\t10\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter:1: header"):
        read_movielens_directory(folder)


def test_loader_bad_item_file(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t1\t5\t10\n",
                           "item_id:token\tmovie_title:token_seq\trelease_year:token\n1\tHeat\n")
    with pytest.raises(DataError, match=r"ml-100k\.item:2: expected 3"):
        read_movielens_directory(folder)


def test_loader_unknown_item(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k", HEADER + "1\t7\t5\t10\n")
    with pytest.raises(DataError, match="item ids missing from the item file"):
        read_movielens_directory(folder)


def test_loader_missing_partner_file(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "ml-100k.inter").write_text(HEADER)
    with pytest.raises(DataError, match=r"ml-100k\.item: missing"):
        read_movielens_directory(folder)


def test_missing_data_offline_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECRL_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"(?s)not found.*ml-100k\.inter.*RECRL_DATA_DIR"):
        load_movielens_ratings(tmp_path / "empty", download=False)


def test_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    def offline(*arguments, **keywords):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(download_cache, "fetch_from_grouplens", offline)
    monkeypatch.setattr(download_cache, "fetch_from_recbole_wheel", offline)
    with pytest.raises(download_cache.MovieLensDownloadError, match=r"(?s)Fix: put.*u\.data.*network unreachable"):
        download_cache.download_movielens_100k(tmp_path, progress=False)


def test_grouplens_format(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t4\t881250951\n")
    (folder / "u.item").write_bytes(
        "1|Shawshank Redemption, The (1994)|01-Jan-1994||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
        "2|Amélie (2001)|01-Jan-2001||http://x|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n".encode("latin-1"))
    ratings = read_movielens_directory(folder)
    assert ratings.file_format == "grouplens"
    assert ratings.movies[1].item == Item("The Shawshank Redemption", 1994)
    assert ratings.movies[1].genres == ("Drama",)
    assert ratings.movies[2].item == Item("Amélie", 2001)
    (folder / "u.data").write_text("1\t1\t5\n")
    with pytest.raises(DataError, match=r"u\.data:1: expected 4"):
        read_movielens_directory(folder)


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
    assert read_movielens_directory(folder).num_interactions == 2
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
    data = build_conversations(read_movielens_directory(folder), list_length=5)
    assert len(data.test) == 2 and len(data.val) == 2 and data.train
    for example in data.test:
        assert len(example.history_item_ids) == 27
