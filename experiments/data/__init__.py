"""Recommendation datasets: Reddit-v2 when present, otherwise the MovieLens-100K conversational set.

``load_recommendation_data(data_dir, list_length)`` is the single entry point.
See ``experiments.data.common`` for the data-directory lookup and layout.

This package never imports ``experiments.baselines``: SFT demonstrations from the
EASE teacher are attached by the caller::

    from experiments.baselines import attach_demonstrations, fit_teacher

    teacher = fit_teacher(data.movielens, part="train")
    attach_demonstrations(data.train, teacher, data.movielens)
    attach_demonstrations(data.val, teacher, data.movielens)
"""

from __future__ import annotations

from pathlib import Path

from experiments.data.cache import file_digest, fingerprint_digests
from experiments.data.common import (
    DataError,
    RecData,
    RecExample,
    cache_dir,
    candidate_data_dirs,
    explicit_data_dir,
    resolve_data_dir,
)
from experiments.data.reddit_v2 import (
    SPLIT_FILES,
    _split_source,
    load_reddit_v2,
    missing_reddit_v2_splits,
    reddit_v2_available,
    reddit_v2_directory,
    reddit_v2_statistics,
)

__all__ = [
    "DataError",
    "RecData",
    "RecExample",
    "cache_dir",
    "candidate_data_dirs",
    "load_recommendation_data",
    "reddit_v2_available",
    "resolve_data_dir",
]


def _reddit_v2_fingerprint(data_dir: Path) -> str:
    """Fingerprint of the Reddit-v2 files ``load_reddit_v2`` reads (the split sources and the catalog).

    A ``save_to_disk`` split folder contributes every file under it, named relative to ``reddit-v2/``.
    """
    directory = reddit_v2_directory(data_dir)
    paths: list[Path] = [directory / "catalog.tsv"]
    for stem in SPLIT_FILES.values():
        source = _split_source(directory, stem)
        if source is not None:
            paths.extend([source] if source.is_file() else sorted(path for path in source.rglob("*") if path.is_file()))
    return fingerprint_digests({path.relative_to(directory).as_posix(): file_digest(path)
                                for path in paths if path.is_file()})


def load_recommendation_data(
    data_dir: str | Path | None = None,
    list_length: int = 10,
    source: str = "auto",
    train_cuts_per_user: int | None = 3,
    verbose: bool = True,
    verify: bool = True,
) -> RecData:
    """Load the recommendation data.

    Args:
        data_dir: the data directory to search (only it); else ``$RECRL_DATA_DIR``,
            then the cache ``~/.cache/recrl`` (where MovieLens-100K is downloaded).
        list_length: N, the number of recommendations each MovieLens prompt asks for
            (Reddit-v2 prompts are fixed at 20).
        source: "auto" (Reddit-v2 when its splits exist in a searched directory,
            else MovieLens), "reddit-v2" or "movielens-100k".
        train_cuts_per_user: MovieLens only: training requests per user, or None
            for one at every usable cutoff of the train part
            (``experiments.data.movielens.build_conversations``).
        verbose: print the dataset statistics.
        verify: MovieLens only: check the record counts of the files read;
            ``False`` for small hand-made test fixtures only.

    Raises:
        DataError: no data set found (an explicit ``data_dir`` is an error when it
            holds none), the download failed, or a file is malformed or incomplete.
    """
    if source not in ("auto", "reddit-v2", "movielens-100k"):
        raise ValueError(f"source must be 'auto', 'reddit-v2' or 'movielens-100k', got {source!r}")
    if source in ("auto", "reddit-v2"):
        for directory in candidate_data_dirs(data_dir):
            if reddit_v2_available(directory):
                splits, catalog = load_reddit_v2(directory)
                statistics = reddit_v2_statistics(splits, catalog)
                if verbose:
                    print(f"[data] reddit-v2 from {directory}: " + ", ".join(
                        f"{key}={value}" for key, value in statistics.items() if key != "source"))
                return RecData(splits["train"], splits["val"], splits["test"], catalog, "reddit-v2", 20, statistics,
                               fingerprint=_reddit_v2_fingerprint(directory))
        if source == "reddit-v2":
            searched = ", ".join(str(directory / "reddit-v2") for directory in candidate_data_dirs(data_dir))
            raise DataError(f"Reddit-v2 conversations not found in {searched}; expected train/validation/test .jsonl files")
    from experiments.data.movielens import EXPECTED_LAYOUT, find_movielens_directory, format_statistics, load_movielens

    explicit = explicit_data_dir(data_dir)
    if explicit is not None and source == "auto" and find_movielens_directory(explicit) is None:
        if reddit_v2_directory(explicit).is_dir():  # started, but not all three splits are there
            missing = ", ".join(f"{stem}.jsonl" for stem in missing_reddit_v2_splits(explicit))
            raise DataError(f"{reddit_v2_directory(explicit)} lacks {missing}: Reddit-v2 needs train, validation "
                            "and test conversations (.jsonl) with catalog.tsv; add the missing files")
        movielens_layout = EXPECTED_LAYOUT.replace("<DATA_DIR>", str(explicit))
        raise DataError(
            f"data directory {explicit} holds no data set; expected {explicit}/reddit-v2/"
            f"{{train,validation,test}}.jsonl with catalog.tsv, or {movielens_layout}. Fix: point --data-dir at "
            f"the folder that contains them, or omit it to use $RECRL_DATA_DIR or the cache {cache_dir()}"
        )
    conversations = load_movielens(data_dir, list_length=list_length, train_cuts_per_user=train_cuts_per_user,
                                   progress=verbose, verify=verify)
    if verbose:
        print(format_statistics(conversations.statistics))
    return RecData(
        train=conversations.train,
        val=conversations.val,
        test=conversations.test,
        catalog=conversations.catalog,
        source="movielens-100k",
        list_length=list_length,
        statistics=conversations.statistics,
        movielens=conversations,
        fingerprint=conversations.ratings.fingerprint,
    )
