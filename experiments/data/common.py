"""The data contract shared by every recommendation dataset, and the data-directory lookup.

Data directory lookup:

* an explicit ``data_dir`` argument (``--data-dir`` on the command line) is the
  only directory searched: when it holds no data set, loading fails with a
  ``DataError`` naming it and the expected layout (no fallback, no download);
* without one, the environment variable ``RECRL_DATA_DIR`` (when set) and then
  the cache ``~/.cache/recrl`` (or ``$RECRL_CACHE_DIR``; downloads go here) are
  searched in that order.

Layout inside a data directory::

    <data_dir>/ml-100k/ml-100k.{inter,item,user,kg,link}   RecBole atomic files, or
    <data_dir>/ml-100k/u.data, u.item (, u.user)          the GroupLens originals
    <data_dir>/reddit-v2/{train,validation,test}.jsonl    Reddit-v2 conversations (or save_to_disk folders)
    <data_dir>/reddit-v2/catalog.tsv                      Reddit-v2 catalog, "title<TAB>year" with header
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewards.catalog import Catalog, Item

DATA_DIR_ENVIRONMENT_VARIABLE = "RECRL_DATA_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/recrl")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the line and the fix."""


@dataclass
class RecExample:
    """One recommendation request, whatever its source.

    The first five fields are the DESIGN.md contract.  The others are filled by
    the MovieLens builder (item ids let classical models and teachers work on
    the same examples) and keep their defaults for Reddit-v2.

    Attributes:
        id: unique id, e.g. ``"ml-100k/test/user-196"``.
        messages: the chat prompt, ``[{"role": "user", "content": ...}]``.
        groundtruth: the items that count as hits (a multiset).
        seen: items the user mentioned or consumed already; never a hit.
        demonstration: SFT target list (``Title (Year)`` lines), if any.
        split: "train", "val" or "test".
        user_id: MovieLens user id.
        history_item_ids: item ids the user rated before the cutoff, oldest first.
        groundtruth_item_ids: item ids of ``groundtruth``, in the same order.
        seen_item_ids: item ids of ``seen`` (for MovieLens, the history).
        cutoff: number of the user's time-ordered interactions before the cutoff.
    """

    id: str
    messages: list[dict]
    groundtruth: list[Item]
    seen: list[Item]
    demonstration: str | None = None
    split: str = ""
    user_id: int | None = None
    history_item_ids: list[int] = field(default_factory=list)
    groundtruth_item_ids: list[int] = field(default_factory=list)
    seen_item_ids: list[int] = field(default_factory=list)
    cutoff: int | None = None

    @property
    def prompt_text(self) -> str:
        """The content of the last user message."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return str(message.get("content", ""))
        return ""


@dataclass
class RecData:
    """A dataset ready for training and evaluation.

    Attributes:
        train, val, test: the examples of each split.
        catalog: the item catalog used for rewards and metrics.
        source: "reddit-v2" or "movielens-100k".
        list_length: the number N of recommendations each prompt asks for.
        statistics: dataset statistics (counts, lengths), JSON-serialisable.
        movielens: the MovieLens conversational set (interaction matrices, item
            titles) when ``source == "movielens-100k"``, else None.
        fingerprint: SHA-256 over the names and SHA-256 digests of the data
            files that were read (``experiments.data.cache.fingerprint_digests``);
            it identifies the data, not the examples built from it (part of an
            SFT cache key together with the building options).  Empty for data
            built in memory.
    """

    train: list[RecExample]
    val: list[RecExample]
    test: list[RecExample]
    catalog: Catalog
    source: str
    list_length: int
    statistics: dict[str, Any] = field(default_factory=dict)
    movielens: Any = None
    fingerprint: str = ""


def cache_dir() -> Path:
    """recrl's cache (downloads, SFT checkpoints): ``$RECRL_CACHE_DIR`` if set, else ``~/.cache/recrl``.

    Expanded, not created.
    """
    return Path(os.environ.get("RECRL_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$RECRL_DATA_DIR`` if set, else the cache.

    The directory is not required to exist (a download may create it).
    """
    return candidate_data_dirs(data_dir)[0]


def explicit_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` as a path when one was given (not None, not ""), else None."""
    if data_dir is None or str(data_dir) == "":
        return None
    return Path(data_dir).expanduser()


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every directory to search, in lookup order, without duplicates.

    ``[data_dir]`` alone when it is given; else ``$RECRL_DATA_DIR`` (when set) and the cache.
    """
    explicit = explicit_data_dir(data_dir)
    if explicit is not None:
        return [explicit]
    candidates: list[Path] = []
    from_environment = os.environ.get(DATA_DIR_ENVIRONMENT_VARIABLE, "")
    if from_environment:
        candidates.append(Path(from_environment).expanduser())
    candidates.append(cache_dir())
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique
