"""Reddit-v2, the conversational movie-recommendation set released with Rank-GRPO.

Layout (one of, per split; the first found wins)::

    <data_dir>/reddit-v2/train.jsonl, validation.jsonl, test.jsonl     one JSON object per line
    <data_dir>/reddit-v2/train/, validation/, test/                    datasets.save_to_disk folders
    <data_dir>/reddit-v2/catalog.tsv                                   "title<TAB>year" with a header line

Fields of each record (docs/rank_grpo.md §6):

* ``prompt``: ``[{"role": "user", "content": ...}]`` -> ``RecExample.messages``;
* ``completion`` (SFT split only): ``[{"role": "assistant", "content": "Title (Year)\\n..."}]``
  -> ``RecExample.demonstration``;
* ``groundtruth_with_release_year``: ``[[title, "year"], ...]`` -> ``groundtruth``;
* ``seen_titles``: ``[title, ...]`` (no years) -> ``seen`` as ``Item(title, None)``.

The prompts were written for 20 recommendations; ``list_length`` does not rewrite them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.data.common import DataError, RecExample
from rewards.catalog import Catalog, Item, coerce_year

SOURCE_NAME = "reddit-v2"
SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}
REQUIRED_FIELDS = ("prompt", "groundtruth_with_release_year", "seen_titles")


def reddit_v2_directory(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser() / "reddit-v2"


def _split_source(directory: Path, file_stem: str) -> Path | None:
    jsonl = directory / f"{file_stem}.jsonl"
    if jsonl.is_file():
        return jsonl
    folder = directory / file_stem
    if folder.is_dir() and ((folder / "dataset_info.json").is_file() or (folder / "state.json").is_file()):
        return folder
    return None


def reddit_v2_available(data_dir: str | Path | None) -> bool:
    """True only when all three conversation splits exist (a catalog alone is not enough)."""
    return data_dir is not None and not missing_reddit_v2_splits(data_dir)


def missing_reddit_v2_splits(data_dir: str | Path) -> list[str]:
    """The conversation splits (file stems) that `data_dir`/reddit-v2 lacks."""
    directory = reddit_v2_directory(data_dir)
    return [stem for stem in SPLIT_FILES.values() if _split_source(directory, stem) is None]


def record_to_example(record: dict[str, Any], identifier: str, split: str, where: str) -> RecExample:
    """Convert one Reddit-v2 record; ``where`` ("file:line") names it in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; Reddit-v2 records need {list(REQUIRED_FIELDS)}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(message, dict) and "content" in message for message in prompt):
        raise DataError(f"{where}: 'prompt' must be a list of {{'role', 'content'}} messages")
    groundtruth: list[Item] = []
    for entry in record["groundtruth_with_release_year"] or []:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise DataError(f"{where}: 'groundtruth_with_release_year' entries must be [title, year], found {entry!r}")
        groundtruth.append(Item(str(entry[0]), coerce_year(entry[1])))
    seen_titles = record["seen_titles"] or []
    if not isinstance(seen_titles, list):
        raise DataError(f"{where}: 'seen_titles' must be a list of titles")
    demonstration = None
    completion = record.get("completion")
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        demonstration = str(completion[-1].get("content", ""))
    elif isinstance(completion, str):
        demonstration = completion
    return RecExample(
        id=identifier,
        messages=[dict(message) for message in prompt],
        groundtruth=groundtruth,
        seen=[Item(str(title), None) for title in seen_titles],
        demonstration=demonstration,
        split=split,
    )


def read_jsonl_split(path: Path, split: str) -> list[RecExample]:
    examples: list[RecExample] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno})") from None
            examples.append(record_to_example(record, f"reddit-v2/{split}/{len(examples)}", split,
                                              f"{path}:{line_number}"))
    return examples


def read_saved_split(folder: Path, split: str) -> list[RecExample]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(
            f"{folder} is a datasets.save_to_disk folder, but the 'datasets' package is not installed; "
            f"pip install datasets, or convert the split to {folder}.jsonl"
        ) from None
    dataset = datasets.load_from_disk(str(folder))
    return [
        record_to_example(dict(record), f"reddit-v2/{split}/{index}", split, f"{folder}[{index}]")
        for index, record in enumerate(dataset)
    ]


def load_reddit_v2(data_dir: str | Path) -> tuple[dict[str, list[RecExample]], Catalog]:
    """Read the three splits and the catalog; {"train": [...], "val": [...], "test": [...]}."""
    directory = reddit_v2_directory(data_dir)
    splits: dict[str, list[RecExample]] = {}
    for split, stem in SPLIT_FILES.items():
        source = _split_source(directory, stem)
        if source is None:
            raise DataError(
                f"{directory / (stem + '.jsonl')}: missing; put the Reddit-v2 {stem} split there "
                f"(JSONL) or a datasets.save_to_disk folder at {directory / stem}"
            )
        splits[split] = read_jsonl_split(source, split) if source.is_file() else read_saved_split(source, split)
    catalog_path = directory / "catalog.tsv"
    if not catalog_path.is_file():
        raise DataError(f"{catalog_path}: missing; put the Reddit-v2 catalog there as 'title<TAB>year' lines with a header")
    return splits, Catalog.from_tsv(catalog_path)


def reddit_v2_statistics(splits: dict[str, list[RecExample]], catalog: Catalog) -> dict[str, Any]:
    statistics: dict[str, Any] = {"source": SOURCE_NAME, "catalog_items": len(catalog)}
    for split, examples in splits.items():
        statistics[f"{split}_examples"] = len(examples)
        statistics[f"{split}_mean_groundtruth"] = (
            round(sum(len(example.groundtruth) for example in examples) / len(examples), 2) if examples else 0.0
        )
    return statistics
