"""Recommendation datasets: Reddit-v2 when present, otherwise the MovieLens-100K conversational set.

``load_recommendation_data(data_dir, list_length)`` is the single entry point.
See ``experiments.data.common`` for the data-directory lookup and layout.
"""

from __future__ import annotations

from pathlib import Path

from experiments.data.common import (
    DataError,
    RecData,
    RecExample,
    cache_dir,
    candidate_data_dirs,
    resolve_data_dir,
)
from experiments.data.reddit_v2 import load_reddit_v2, reddit_v2_available, reddit_v2_statistics

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


def load_recommendation_data(
    data_dir: str | Path | None = None,
    list_length: int = 10,
    source: str = "auto",
    teacher_demonstrations: bool = False,
    verbose: bool = True,
) -> RecData:
    """Load the recommendation data.

    Args:
        data_dir: data directory (else ``$RECRL_DATA_DIR``, else ``~/.cache/recrl``).
        list_length: N, the number of recommendations each MovieLens prompt asks for
            (Reddit-v2 prompts are fixed at 20).
        source: "auto" (Reddit-v2 when its splits exist in a searched directory,
            else MovieLens), "reddit-v2" or "movielens-100k".
        teacher_demonstrations: MovieLens only: fill ``demonstration`` of the
            train and val examples with an EASE teacher fitted on the train part.
        verbose: print the dataset statistics.
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
                return RecData(splits["train"], splits["val"], splits["test"], catalog, "reddit-v2", 20, statistics)
        if source == "reddit-v2":
            searched = ", ".join(str(directory / "reddit-v2") for directory in candidate_data_dirs(data_dir))
            raise DataError(f"Reddit-v2 conversations not found in {searched}; expected train/validation/test .jsonl files")
    from experiments.data.movielens import format_statistics, load_movielens

    conversations = load_movielens(data_dir, list_length=list_length, progress=verbose)
    if teacher_demonstrations:
        from experiments.baselines import attach_demonstrations, fit_teacher

        teacher = fit_teacher(conversations, part="train")
        attach_demonstrations(conversations.train, teacher, conversations)
        attach_demonstrations(conversations.val, teacher, conversations)
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
    )
