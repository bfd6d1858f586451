"""Reddit-v2 loader: layout, fields, availability and clear errors (small files in tmp_path)."""

import json
import os
from pathlib import Path

import pytest

from experiments.data import load_recommendation_data, reddit_v2_available
from experiments.data.common import DataError
from experiments.data.reddit_v2 import load_reddit_v2, reddit_v2_directory
from rewards.catalog import Item
from rewards.ranking import evaluate_list


def real_catalog_path() -> Path | None:
    """$RECRL_DATA_DIR/reddit-v2/catalog.tsv, or None when the variable is unset or the file absent."""
    data_dir = os.environ.get("RECRL_DATA_DIR")
    path = reddit_v2_directory(data_dir) / "catalog.tsv" if data_dir else None
    return path if path is not None and path.is_file() else None


REAL_CATALOG = real_catalog_path()

RECORD = {
    "prompt": [{"role": "user", "content": "Pretend you are a movie recommender system. ... USER: something like Alien?"}],
    "completion": [{"role": "assistant", "content": "Aliens (1986)\nHeat (1995)"}],
    "groundtruth_with_release_year": [["Aliens", "1986"], ["The Thing", "1982"]],
    "seen_titles": ["Alien"],
}


def write_reddit(root: Path, records=(RECORD,), splits=("train", "validation", "test"), catalog=True) -> Path:
    folder = root / "reddit-v2"
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if catalog:
        (folder / "catalog.tsv").write_text("title\tyear\nAliens\t1986\nThe Thing\t1982\nHeat\t1995\nAlien\t1979\n")
    return root


def test_availability_needs_conversations(tmp_path):
    assert not reddit_v2_available(tmp_path)
    write_reddit(tmp_path, splits=(), catalog=True)
    assert not reddit_v2_available(tmp_path)  # a catalog alone is not enough
    write_reddit(tmp_path, splits=("train", "validation"))
    assert not reddit_v2_available(tmp_path)
    write_reddit(tmp_path)
    assert reddit_v2_available(tmp_path)
    assert not reddit_v2_available(None)


def test_fields_are_mapped(tmp_path):
    splits, catalog = load_reddit_v2(write_reddit(tmp_path))
    example = splits["test"][0]
    assert example.messages == RECORD["prompt"]
    assert example.groundtruth == [Item("Aliens", 1986), Item("The Thing", 1982)]
    assert example.seen == [Item("Alien", None)]
    assert example.demonstration == "Aliens (1986)\nHeat (1995)"
    assert example.split == "test" and example.history_item_ids == [] and example.user_id is None
    metrics = evaluate_list("Alien (1979)\nAliens (1986)\nThing, The (1982)", example, catalog)
    assert metrics["recall@5"] == 1.0  # the seen "Alien" is compacted away


def test_load_recommendation_data_prefers_reddit(tmp_path):
    data = load_recommendation_data(write_reddit(tmp_path), verbose=False)
    assert data.source == "reddit-v2" and len(data.train) == len(data.val) == len(data.test) == 1
    assert data.list_length == 20 and len(data.catalog) == 4


def test_malformed_json_names_file_and_line(tmp_path):
    root = write_reddit(tmp_path)
    (root / "reddit-v2" / "validation.jsonl").write_text(json.dumps(RECORD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"validation\.jsonl:2: not valid JSON"):
        load_reddit_v2(root)


def test_missing_field_names_file_and_line(tmp_path):
    broken = {key: value for key, value in RECORD.items() if key != "seen_titles"}
    root = write_reddit(tmp_path)
    (root / "reddit-v2" / "train.jsonl").write_text(json.dumps(RECORD) + "\n\n" + json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:3: missing field\(s\) \['seen_titles'\]"):
        load_reddit_v2(root)


def test_wrong_groundtruth_shape(tmp_path):
    broken = dict(RECORD, groundtruth_with_release_year=[["Aliens", "1986", "extra"]])
    root = write_reddit(tmp_path, records=(broken,))
    with pytest.raises(DataError, match=r"train\.jsonl:1: 'groundtruth_with_release_year'"):
        load_reddit_v2(root)


def test_missing_split_and_catalog(tmp_path):
    with pytest.raises(DataError, match=r"train\.jsonl: missing"):
        load_reddit_v2(tmp_path)
    root = write_reddit(tmp_path, catalog=False)
    with pytest.raises(DataError, match=r"catalog\.tsv: missing"):
        load_reddit_v2(root)
    with pytest.raises(DataError, match="Reddit-v2 conversations not found"):
        load_recommendation_data(tmp_path / "nothing", source="reddit-v2", verbose=False)


def test_save_to_disk_without_datasets_is_a_clear_error(tmp_path):
    pytest.importorskip("json")
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed")
    except ImportError:
        pass
    root = write_reddit(tmp_path, splits=("validation", "test"))
    saved = root / "reddit-v2" / "train"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    assert reddit_v2_available(root)
    with pytest.raises(DataError, match=r"pip install datasets"):
        load_reddit_v2(root)


@pytest.mark.skipif(REAL_CATALOG is None, reason="set RECRL_DATA_DIR to a folder with reddit-v2/catalog.tsv")
def test_real_catalog_with_fake_conversations(tmp_path):
    root = write_reddit(tmp_path, catalog=False)
    (root / "reddit-v2" / "catalog.tsv").write_bytes(REAL_CATALOG.read_bytes())
    splits, catalog = load_reddit_v2(root)
    assert len(catalog) > 7300
    assert Item("10 Cloverfield Lane", 2016) in catalog


def test_an_incomplete_reddit_folder_names_the_missing_splits(tmp_path):
    folder = reddit_v2_directory(tmp_path)
    folder.mkdir()
    (folder / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"reddit-v2 lacks validation.jsonl, test.jsonl: Reddit-v2 needs train"):
        load_recommendation_data(str(tmp_path))
