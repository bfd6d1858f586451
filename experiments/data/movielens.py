"""MovieLens-100K as conversational recommendation requests.

Files
-----
Read from ``<data_dir>/ml-100k/``, RecBole atomic files first, then the GroupLens originals:

* ``ml-100k.inter`` (user_id, item_id, rating, timestamp) or ``u.data``;
* ``ml-100k.item`` (item_id, movie_title, release_year, class) or ``u.item``
  (``|``-separated, Latin-1, title "Toy Story (1995)", release date "01-Jan-1995");
* ``ml-100k.user`` or ``u.user`` (age, gender, occupation, zip code), optional;
* ``ml-100k.link`` (item -> Freebase entity) and ``ml-100k.kg`` (triples),
  optional and read only on request (``load_knowledge_graph``).

The search is the one of ``experiments.data.common`` (an explicit ``data_dir``
is the only place searched; otherwise ``$RECRL_DATA_DIR``, then the cache, then
a download into the cache).

Integrity
---------
Every file that is read is checked against the record counts of the
MovieLens-100K release (Harper & Konstan 2015, the GroupLens README):
100,000 ratings by 943 users on 1,682 items; the RecBole link and
knowledge-graph files of RecBole 1.2.1 hold 1,598 links and 91,631 triples.
A truncated or foreign file is a ``DataError`` naming the file, the expected
and the found counts and the fix; ``verify=False`` turns the check off for
small hand-made fixtures (tests) and is never used by the command line.  The
SHA-256 of every file read is kept (``MovieLensRatings.file_digests``) and
summarised in ``MovieLensRatings.fingerprint``.

Titles are written as people write them: a trailing article moves to the front
("Shawshank Redemption, The" -> "The Shawshank Redemption", also ", A", ", An",
", Les", ", La", ", Il", ", Das", ...), and a parenthesised alternative title is
dropped from the display title but kept as a catalog alias
("Seven (Se7en)" -> "Seven", alias "Se7en").  The year is the release year;
where the year column is not a year (RecBole item 1412 has "V") a "(YYYY)" at
the end of the title is used.  Items without a year (item 267 "unknown") stay
in the interaction sequences, so the split is RecBole's, but never appear in a
prompt, a ground truth or the catalog.

Split (RecBole ``group_by: user, order: TO, split: {RS: [0.8, 0.1, 0.1]}``)
-----------------------------------------------------------------------------
Each user's interactions are ordered by timestamp with a *stable* sort over
file order (RecBole's ``Interaction.sort`` is a stable numpy argsort), and cut
with RecBole's ``_calcu_split_ids`` rounding: for n interactions,
n_val = int(0.1 * n), n_test = int(0.1 * n), n_train = n - n_val - n_test,
after which a split whose exact size ratio * n lies in (0, 1) is raised to 1
(taken from train) while train keeps more than one.  The first n_train
interactions are train, the next n_val validation, the last n_test test.

Examples
--------
Liked = rating >= 4.  An example at a cutoff c (the number of the user's
time-ordered interactions before it) has

* history = the first c interactions; ``seen`` = all of them;
* request text = the user's most recent liked history movies (up to 10, with
  years; the most recently *rated* ones when none was liked) and a request for
  N recommendations, one per line as ``Title (Year)``;
* ground truth = the liked movies in the target window after the cutoff.

Test: c = n_train + n_val, window = the test part.  Validation: c = n_train,
window = the validation part.  Training: cutoffs c in [min_history, n_train - w]
with the window w = n_test interactions (at least 1), so that every training
window lies inside the train part and looks like a test window;
``train_cuts_per_user = k`` takes k cut points spread evenly over that range,
``train_cuts_per_user = None`` takes every cutoff in it (dense requests: each
prefix of the training history, "history so far -> the next liked items").
Examples with an empty ground truth (or no movie to show) are skipped.  The
validation and test examples do not depend on ``train_cuts_per_user``.
Everything is deterministic.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.data.cache import (
    RECBOLE_FILE_SHA256,
    download_lock,
    download_movielens_100k,
    file_digest,
    fingerprint_digests,
    where_to_put_files_message,
)
from experiments.data.common import DataError, RecExample, cache_dir, candidate_data_dirs, explicit_data_dir
from rewards.catalog import Catalog, Item, move_trailing_article
from rewards.lists import format_item

LIKED_RATING = 4.0
SPLIT_RATIOS = (0.8, 0.1, 0.1)
MOST_RECENT_LIKED_IN_PROMPT = 10
SOURCE_NAME = "movielens-100k"

# Record counts of the MovieLens-100K release, per file kind (module docstring, "Integrity").
ML_100K_RATINGS = {"ratings": 100_000, "users": 943, "items": 1_682}
ML_100K_ITEMS = {"items": 1_682}
ML_100K_USERS = {"users": 943}
ML_100K_LINKS = {"links": 1_598}
ML_100K_TRIPLES = {"triples": 91_631}

_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")
_TRAILING_PARENTHESISED = re.compile(r"^(?P<body>.*\S)\s*\((?P<inner>[^()]*)\)\s*$")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Movie:
    """One ML-100K item: ``title`` as people write it, ``raw_title`` as in the file, ``aliases``."""

    item_id: int
    title: str
    year: int | None
    raw_title: str
    genres: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def item(self) -> Item:
        return Item(self.title, self.year)


@dataclass(frozen=True)
class UserProfile:
    user_id: int
    age: int | None
    gender: str
    occupation: str
    zip_code: str


@dataclass
class MovieLensRatings:
    """The raw ML-100K tables. Interaction arrays are in file order.

    ``file_digests`` maps the name of every file read to its SHA-256.
    """

    user_ids: np.ndarray  # int64 [num_interactions]
    item_ids: np.ndarray  # int64 [num_interactions]
    ratings: np.ndarray  # float32 [num_interactions]
    timestamps: np.ndarray  # int64 [num_interactions]
    movies: dict[int, Movie]
    users: dict[int, UserProfile]
    directory: Path
    file_format: str  # "recbole" or "grouplens"
    file_digests: dict[str, str] = field(default_factory=dict)

    @property
    def num_interactions(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the names and digests of the files read (``cache.fingerprint_digests``)."""
        return fingerprint_digests(self.file_digests)


# --------------------------------------------------------------------------- titles


def display_title(raw_title: str) -> tuple[str, tuple[str, ...], int | None]:
    """Split a catalog title into (title as people write it, alternative titles, year found in it).

    >>> display_title("Shawshank Redemption, The")
    ('The Shawshank Redemption', (), None)
    >>> display_title("City of Lost Children, The (Cité des enfants perdus, La)")
    ('The City of Lost Children', ('La Cité des enfants perdus',), None)
    >>> display_title("Toy Story (1995)")
    ('Toy Story', (), 1995)
    """
    text = " ".join(raw_title.split())
    year_in_title: int | None = None
    alternatives: list[str] = []
    while True:
        year_match = _YEAR_IN_TITLE.search(text)
        if year_match is not None and year_match.start() > 0:
            year_in_title = year_in_title or int(year_match.group(1))
            text = text[: year_match.start()]
            continue
        match = _TRAILING_PARENTHESISED.match(text)
        if match is None:
            break
        alternatives.insert(0, move_trailing_article(match.group("inner").strip()))
        text = match.group("body")
    title = move_trailing_article(text.strip())
    return title, tuple(alternative for alternative in alternatives if alternative), year_in_title


def _parse_year(text: str, title_year: int | None) -> int | None:
    text = text.strip()
    if len(text) == 4 and text.isdigit():
        return int(text)
    if len(text) >= 4 and text[-4:].isdigit():  # GroupLens release dates "01-Jan-1995"
        return int(text[-4:])
    return title_year


# --------------------------------------------------------------------------- file readers


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid {encoding} text ({error}); is this the right file?") from error


def _header_columns(path: Path, header: str, required: tuple[str, ...]) -> dict[str, int]:
    """Map RecBole column names ("user_id:token" -> "user_id") to indices; check the required ones."""
    names = [column.split(":", 1)[0].strip() for column in header.split("\t")]
    missing = [name for name in required if name not in names]
    if missing:
        raise DataError(
            f"{path}:1: header {header!r} lacks column(s) {missing}; expected RecBole atomic columns "
            f"{', '.join(required)} (e.g. 'user_id:token')"
        )
    return {name: index for index, name in enumerate(names)}


def _parse_int(path: Path, line_number: int, column: str, text: str) -> int:
    try:
        return int(float(text)) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise DataError(f"{path}:{line_number}: column {column!r} should be a number, found {text!r}") from None


def _split_line(path: Path, line_number: int, line: str, separator: str, expected: int, exact: bool = True) -> list[str]:
    fields = line.split(separator)
    if (exact and len(fields) != expected) or len(fields) < expected:
        raise DataError(
            f"{path}:{line_number}: expected {expected} {separator!r}-separated columns, found {len(fields)}: {line[:120]!r}"
        )
    return fields


def _interactions_from_rows(
    path: Path, lines: list[str], first_line_number: int, columns: tuple[int, int, int, int], width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    user_column, item_column, rating_column, time_column = columns
    users: list[int] = []
    items: list[int] = []
    ratings: list[float] = []
    times: list[int] = []
    for offset, line in enumerate(lines):
        if not line.strip():
            continue
        line_number = first_line_number + offset
        fields = _split_line(path, line_number, line, "\t", width)
        try:
            users.append(int(fields[user_column]))
            items.append(int(fields[item_column]))
            ratings.append(float(fields[rating_column]))
            times.append(int(float(fields[time_column])))
        except ValueError:
            names = ("user_id", "item_id", "rating", "timestamp")
            for name, column in zip(names, columns):
                try:
                    float(fields[column])
                except ValueError:
                    raise DataError(
                        f"{path}:{line_number}: column {name!r} should be a number, found {fields[column]!r}"
                    ) from None
            raise
    if not users:
        raise DataError(f"{path}: no interactions found; the file is empty")
    return (
        np.asarray(users, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        np.asarray(ratings, dtype=np.float32),
        np.asarray(times, dtype=np.int64),
    )


def read_recbole_interactions(path: Path):
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"{path}: the file is empty; expected a header 'user_id:token<TAB>item_id:token<TAB>...'")
    columns = _header_columns(path, lines[0], ("user_id", "item_id", "rating", "timestamp"))
    width = len(lines[0].split("\t"))
    order = (columns["user_id"], columns["item_id"], columns["rating"], columns["timestamp"])
    return _interactions_from_rows(path, lines[1:], 2, order, width)


def read_grouplens_interactions(path: Path):
    return _interactions_from_rows(path, _read_lines(path, "latin-1"), 1, (0, 1, 2, 3), 4)


def _make_movie(item_id: int, raw_title: str, year_text: str, genres: tuple[str, ...]) -> Movie:
    title, aliases, title_year = display_title(raw_title)
    year = _parse_year(year_text, title_year)
    if not title or title.casefold() in ("unknown", "unkonwn"):  # RecBole spells item 267 "unkonwn"
        return Movie(item_id, raw_title or "unknown", None, raw_title, genres, ())
    return Movie(item_id, title, year, raw_title, genres, aliases)


def read_recbole_items(path: Path) -> dict[int, Movie]:
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"{path}: the file is empty; expected a header 'item_id:token<TAB>movie_title:token_seq<TAB>...'")
    columns = _header_columns(path, lines[0], ("item_id", "movie_title", "release_year"))
    width = len(lines[0].split("\t"))
    movies: dict[int, Movie] = {}
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = _split_line(path, line_number, line, "\t", width)
        item_id = _parse_int(path, line_number, "item_id", fields[columns["item_id"]])
        genres = tuple(fields[columns["class"]].split()) if "class" in columns else ()
        movies[item_id] = _make_movie(item_id, fields[columns["movie_title"]], fields[columns["release_year"]], genres)
    return movies


GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


def read_grouplens_items(path: Path) -> dict[int, Movie]:
    movies: dict[int, Movie] = {}
    for line_number, line in enumerate(_read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        fields = _split_line(path, line_number, line, "|", 5, exact=False)
        item_id = _parse_int(path, line_number, "movie id", fields[0])
        flags = fields[5:5 + len(GROUPLENS_GENRES)]
        genres = tuple(name for name, flag in zip(GROUPLENS_GENRES, flags) if flag.strip() == "1")
        movies[item_id] = _make_movie(item_id, fields[1], fields[2], genres)
    return movies


def _read_users(path: Path, separator: str, has_header: bool) -> dict[int, UserProfile]:
    users: dict[int, UserProfile] = {}
    lines = _read_lines(path, "utf-8" if has_header else "latin-1")
    start = 1 if has_header else 0
    for line_number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = _split_line(path, line_number, line, separator, 5)
        user_id = _parse_int(path, line_number, "user_id", fields[0])
        age = int(fields[1]) if fields[1].strip().isdigit() else None
        users[user_id] = UserProfile(user_id, age, fields[2].strip(), fields[3].strip(), fields[4].strip())
    return users


def _count_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{value:,} {name}" for name, value in counts.items())


def check_record_counts(path: Path, found: dict[str, int], expected: dict[str, int]) -> None:
    """Raise a ``DataError`` naming the file, both counts and the fix unless ``found == expected``."""
    if found == expected:
        return
    known_digest = RECBOLE_FILE_SHA256.get(path.name)
    digest_hint = f" (RecBole's {path.name} has sha256 {known_digest})" if known_digest else ""
    cache_folder = cache_dir() / "ml-100k"
    if path.parent.resolve() == cache_folder.resolve():
        fix = f"delete {path.parent} and run again with network access to download ML-100K again"
    else:
        fix = (f"copy the complete file there{digest_hint}, or delete {path.parent} and run without --data-dir "
               f"or $RECRL_DATA_DIR pointing at it, with network access, to download ML-100K into {cache_folder}")
    raise DataError(
        f"{path}: found {_count_text(found)}, but MovieLens-100K has {_count_text(expected)}; the file is "
        f"truncated or not from the ML-100K release. Fix: {fix}"
    )


def load_knowledge_graph(
    directory: Path, verify: bool = True
) -> tuple[dict[int, str], list[tuple[str, str, str]]]:
    """Read ``ml-100k.link`` (item id -> Freebase entity) and ``ml-100k.kg`` (head, relation, tail triples).

    ``verify``: check the record counts of RecBole's ML-100K files (module docstring).
    """
    directory = Path(directory)
    links: dict[int, str] = {}
    link_path = directory / "ml-100k.link"
    lines = _read_lines(link_path)
    _header_columns(link_path, lines[0] if lines else "", ("item_id", "entity_id"))
    for line_number, line in enumerate(lines[1:], start=2):
        if line.strip():
            fields = _split_line(link_path, line_number, line, "\t", 2)
            links[_parse_int(link_path, line_number, "item_id", fields[0])] = fields[1]
    kg_path = directory / "ml-100k.kg"
    lines = _read_lines(kg_path)
    _header_columns(kg_path, lines[0] if lines else "", ("head_id", "relation_id", "tail_id"))
    triples: list[tuple[str, str, str]] = []
    for line_number, line in enumerate(lines[1:], start=2):
        if line.strip():
            head, relation, tail = _split_line(kg_path, line_number, line, "\t", 3)
            triples.append((head, relation, tail))
    if verify:
        check_record_counts(link_path, {"links": len(links)}, ML_100K_LINKS)
        check_record_counts(kg_path, {"triples": len(triples)}, ML_100K_TRIPLES)
    return links, triples


MOVIELENS_DATA_FILES = ("ml-100k.inter", "ml-100k.item", "u.data", "u.item")
EXPECTED_LAYOUT = (
    "<DATA_DIR>/ml-100k/ml-100k.inter and ml-100k.item (RecBole atomic files, optionally .user/.kg/.link) "
    "or <DATA_DIR>/ml-100k/u.data and u.item (GroupLens files)"
)


def find_movielens_directory(data_dir: str | Path | None = None) -> Path | None:
    """The first searched ``<dir>/ml-100k`` holding any ML-100K rating or item file.

    A folder with only part of a layout is returned too, so that reading it
    names the missing file instead of skipping it silently.
    """
    for directory in candidate_data_dirs(data_dir):
        folder = directory / "ml-100k"
        if any((folder / name).is_file() for name in MOVIELENS_DATA_FILES):
            return folder
    return None


def read_movielens_directory(folder: Path, verify: bool = True) -> MovieLensRatings:
    """Read the ML-100K tables from one folder (RecBole atomic files preferred).

    ``verify``: check every file's record counts against the ML-100K release
    (module docstring); ``False`` only for small hand-made fixtures.
    """
    folder = Path(folder)
    if (folder / "ml-100k.inter").is_file() or (folder / "ml-100k.item").is_file():
        for name in ("ml-100k.inter", "ml-100k.item"):
            if not (folder / name).is_file():
                raise DataError(f"{folder / name}: missing; RecBole atomic files need both ml-100k.inter and ml-100k.item")
        interaction_path, item_path, user_path = (folder / f"ml-100k.{kind}" for kind in ("inter", "item", "user"))
        user_ids, item_ids, ratings, timestamps = read_recbole_interactions(interaction_path)
        movies = read_recbole_items(item_path)
        users = _read_users(user_path, "\t", has_header=True) if user_path.is_file() else {}
        file_format = "recbole"
    else:
        for name in ("u.data", "u.item"):
            if not (folder / name).is_file():
                raise DataError(
                    f"{folder / name}: missing; put the RecBole files ml-100k.inter/.item or the GroupLens files "
                    f"u.data/u.item into {folder}"
                )
        interaction_path, item_path, user_path = (folder / name for name in ("u.data", "u.item", "u.user"))
        user_ids, item_ids, ratings, timestamps = read_grouplens_interactions(interaction_path)
        movies = read_grouplens_items(item_path)
        users = _read_users(user_path, "|", has_header=False) if user_path.is_file() else {}
        file_format = "grouplens"
    if verify:
        found = {"ratings": int(user_ids.shape[0]), "users": int(np.unique(user_ids).shape[0]),
                 "items": int(np.unique(item_ids).shape[0])}
        check_record_counts(interaction_path, found, ML_100K_RATINGS)
        check_record_counts(item_path, {"items": len(movies)}, ML_100K_ITEMS)
        if user_path.is_file():
            check_record_counts(user_path, {"users": len(users)}, ML_100K_USERS)
    unknown_items = sorted(set(np.unique(item_ids).tolist()) - set(movies))
    if unknown_items:
        raise DataError(
            f"{folder}: interactions name item ids missing from the item file, e.g. {unknown_items[:5]}; "
            "the interaction and item files do not belong together"
        )
    read_paths = [path for path in (interaction_path, item_path, user_path) if path.is_file()]
    digests = {path.name: file_digest(path) for path in read_paths}
    return MovieLensRatings(user_ids, item_ids, ratings, timestamps, movies, users, folder, file_format, digests)


def load_movielens_ratings(
    data_dir: str | Path | None = None, download: bool = True, progress: bool = True, verify: bool = True
) -> MovieLensRatings:
    """Find and read ML-100K; without an explicit ``data_dir``, download it into the cache when missing.

    Raises:
        DataError: an explicit ``data_dir`` holds no ML-100K folder; nothing was found
            and ``download`` is off or the download failed (offline); a file is malformed
            or (``verify``) has the wrong record counts.
    """
    folder = find_movielens_directory(data_dir)
    if folder is None:
        explicit = explicit_data_dir(data_dir)
        if explicit is not None:
            state = "does not exist" if not explicit.is_dir() else "holds no MovieLens-100K files"
            layout = EXPECTED_LAYOUT.replace("<DATA_DIR>", str(explicit))
            raise DataError(
                f"data directory {explicit} {state}; expected {layout}. "
                "Fix: point --data-dir at the folder that contains ml-100k/, or omit it to use $RECRL_DATA_DIR "
                f"or the cache {cache_dir()} (downloaded when missing)"
            )
        searched = candidate_data_dirs(data_dir)
        if not download:
            raise DataError(where_to_put_files_message(searched, cache_dir()))
        with download_lock(cache_dir()):  # another run may have downloaded it while this one waited
            folder = find_movielens_directory(data_dir) or download_movielens_100k(
                cache_dir(), searched=searched, progress=progress)
    return read_movielens_directory(folder, verify=verify)


# --------------------------------------------------------------------------- split


def recbole_split_sizes(total: int, ratios: tuple[float, ...] = SPLIT_RATIOS) -> list[int]:
    """Sizes of each part, exactly as RecBole 1.2's ``Dataset._calcu_split_ids``.

    Every part but the first is rounded down; the first takes the rest; then a
    part whose exact share ratio * total lies in (0, 1) is raised to 1 (from the
    first part) while the first part keeps more than one.
    """
    ratio_sum = sum(ratios)
    normalised = [ratio / ratio_sum for ratio in ratios]
    counts = [int(ratio * total) for ratio in normalised]
    counts[0] = total - sum(counts[1:])
    for index in range(1, len(normalised)):
        if counts[0] <= 1:
            break
        if 0 < normalised[-index] * total < 1:
            counts[-index] += 1
            counts[0] -= 1
    return counts


@dataclass
class UserTimeline:
    """One user's interactions in time order and their split boundaries."""

    user_id: int
    item_ids: list[int]
    ratings: list[float]
    timestamps: list[int]
    num_train: int
    num_val: int
    num_test: int

    @property
    def train_end(self) -> int:
        return self.num_train

    @property
    def val_end(self) -> int:
        return self.num_train + self.num_val


def user_timelines(ratings: MovieLensRatings) -> list[UserTimeline]:
    """Group interactions by user (ascending id), order each by time (stable), and split them."""
    order = np.lexsort((np.arange(ratings.num_interactions), ratings.timestamps, ratings.user_ids))
    users = ratings.user_ids[order]
    boundaries = np.flatnonzero(np.diff(users)) + 1
    timelines: list[UserTimeline] = []
    for indices in np.split(order, boundaries):
        if len(indices) == 0:
            continue
        num_train, num_val, num_test = recbole_split_sizes(len(indices))
        timelines.append(
            UserTimeline(
                user_id=int(ratings.user_ids[indices[0]]),
                item_ids=ratings.item_ids[indices].tolist(),
                ratings=ratings.ratings[indices].tolist(),
                timestamps=ratings.timestamps[indices].tolist(),
                num_train=num_train,
                num_val=num_val,
                num_test=num_test,
            )
        )
    return timelines


# --------------------------------------------------------------------------- prompts and examples


def describe_user(profile: UserProfile | None) -> str:
    if profile is None:
        return ""
    gender = {"M": "man", "F": "woman"}.get(profile.gender.upper(), "person")
    age = f"{profile.age}-year-old " if profile.age else ""
    occupation = profile.occupation if profile.occupation and profile.occupation != "none" else ""
    job = f" working as {'an' if occupation[:1] in 'aeiou' else 'a'} {occupation}" if occupation else ""
    return f"I am a {age}{gender}{job}. "


def request_text(history_movies: list[Movie], liked: bool, list_length: int, profile: UserProfile | None) -> str:
    """The user's request: recent movies with years, and the output format."""
    movie_lines = "\n".join(format_item(movie.item) for movie in history_movies)
    what = "Movies I liked recently" if liked else "Movies I watched recently"
    return (
        f"{describe_user(profile)}{what}, the most recent last:\n{movie_lines}\n\n"
        f"Recommend {list_length} other movies I have not watched yet. Reply with exactly {list_length} lines, "
        "one movie per line in the form Title (Year), with no numbering and no other words."
    )


@dataclass
class MovieLensConversations:
    """The MovieLens conversational set: examples, catalog, and what classical models need.

    Attributes:
        ratings: the raw tables.
        timelines: per-user time-ordered, split interactions.
        catalog: all ML-100K items with a year (aliases: alternative titles).
        train, val, test: the examples.
        list_length: N.
        num_item_columns: width of the interaction matrices (max item id + 1;
            column = item id, column 0 unused).
    """

    ratings: MovieLensRatings
    timelines: list[UserTimeline]
    catalog: Catalog
    train: list[RecExample]
    val: list[RecExample]
    test: list[RecExample]
    list_length: int
    num_item_columns: int
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def movies(self) -> dict[int, Movie]:
        return self.ratings.movies

    def item_of(self, item_id: int) -> Item:
        return self.ratings.movies[item_id].item

    def recommendable(self, item_id: int) -> bool:
        """True when the item has a title and a year (it can appear in prompts and answers)."""
        movie = self.ratings.movies.get(item_id)
        return movie is not None and movie.year is not None

    @functools.cached_property
    def recommendable_items(self) -> dict[int, Item]:
        """Item id -> ``Item`` for every recommendable item (one shared ``Item`` per id)."""
        return {item_id: movie.item for item_id, movie in self.ratings.movies.items() if movie.year is not None}

    @functools.cached_property
    def unrecommendable_item_ids(self) -> frozenset[int]:
        """Matrix columns that are not recommendable items (column 0 and items without a year)."""
        return frozenset(item_id for item_id in range(self.num_item_columns) if not self.recommendable(item_id))

    def interaction_matrix(self, part: str = "train") -> np.ndarray:
        """Binary user x item matrix (float32, [num_users, num_item_columns]) of one split part.

        ``part`` is "train" (each user's train part; fit here, select on val) or
        "train+val" (train and validation parts; refit here for the test table).
        Row r belongs to ``timelines[r]``; the column of item id i is i.
        """
        if part not in ("train", "train+val"):
            raise ValueError(f"part must be 'train' or 'train+val', got {part!r}")
        matrix = np.zeros((len(self.timelines), self.num_item_columns), dtype=np.float32)
        for row, timeline in enumerate(self.timelines):
            end = timeline.train_end if part == "train" else timeline.val_end
            matrix[row, timeline.item_ids[:end]] = 1.0
        return matrix


def _example(
    timeline: UserTimeline,
    movies: dict[int, Movie],
    items: dict[int, Item],
    users: dict[int, UserProfile],
    split: str,
    cutoff: int,
    window_end: int,
    list_length: int,
    identifier: str,
) -> RecExample | None:
    """The example at one cutoff (module docstring), or None when it has no ground truth or nothing to show.

    ``items`` maps every recommendable item id to one shared ``Item`` (dense
    training sets hold millions of references to them).
    """
    history_ids = timeline.item_ids[:cutoff]
    recommendable_history = [
        (item_id, rating)
        for item_id, rating in zip(history_ids, timeline.ratings[:cutoff])
        if item_id in items
    ]
    liked_history = [item_id for item_id, rating in recommendable_history if rating >= LIKED_RATING]
    shown_ids = liked_history or [item_id for item_id, _ in recommendable_history]
    shown_ids = shown_ids[-MOST_RECENT_LIKED_IN_PROMPT:]
    groundtruth_ids = [
        item_id
        for item_id, rating in zip(timeline.item_ids[cutoff:window_end], timeline.ratings[cutoff:window_end])
        if rating >= LIKED_RATING and item_id in items
    ]
    if not shown_ids or not groundtruth_ids:
        return None
    text = request_text([movies[item_id] for item_id in shown_ids], bool(liked_history), list_length,
                        users.get(timeline.user_id))
    seen_ids = list(dict.fromkeys(history_ids))
    return RecExample(
        id=identifier,
        messages=[{"role": "user", "content": text}],
        groundtruth=[items[item_id] for item_id in groundtruth_ids],
        seen=[items[item_id] for item_id in seen_ids if item_id in items],
        demonstration=None,
        split=split,
        user_id=timeline.user_id,
        history_item_ids=list(history_ids),
        groundtruth_item_ids=groundtruth_ids,
        seen_item_ids=seen_ids,
        cutoff=cutoff,
    )


def training_cutoffs(timeline: UserTimeline, cuts_per_user: int | None, min_history: int) -> list[tuple[int, int]]:
    """(cutoff, window end) pairs inside the train part, ascending.

    The window has n_test interactions (at least 1) so that training targets
    resemble test targets; cutoff + window <= n_train.  The cutoffs range over
    [min(min_history, highest), highest] (at least 1), highest = n_train - window:
    ``cuts_per_user`` evenly spread points of it (rounded, duplicates merged),
    or all of it when ``cuts_per_user`` is None.
    """
    if cuts_per_user is not None and cuts_per_user < 0:
        raise ValueError(f"train_cuts_per_user must be >= 0 or None (every cutoff), got {cuts_per_user}")
    window = max(1, timeline.num_test)
    highest = timeline.num_train - window
    lowest = max(1, min(min_history, highest))
    if cuts_per_user == 0 or highest < 1:
        return []
    if cuts_per_user is None:
        cutoffs = list(range(lowest, highest + 1))
    else:
        cutoffs = sorted(set(np.linspace(lowest, highest, num=cuts_per_user).round().astype(int).tolist()))
    return [(cutoff, cutoff + window) for cutoff in cutoffs]


def build_catalog(movies: dict[int, Movie]) -> Catalog:
    """All items with a year; the raw file titles and alternative titles are aliases."""
    items = [movie.item for movie in movies.values() if movie.year is not None]
    aliases: dict[str, Item] = {}
    for movie in movies.values():
        if movie.year is None:
            continue
        aliases[movie.raw_title] = movie.item
        for alias in movie.aliases:
            aliases.setdefault(alias, movie.item)
    return Catalog(items, aliases=aliases)


def build_conversations(
    ratings: MovieLensRatings,
    list_length: int = 10,
    train_cuts_per_user: int | None = 3,
    min_history: int = 5,
) -> MovieLensConversations:
    """Split per user and turn every cutoff into a ``RecExample`` (rules in the module docstring).

    ``train_cuts_per_user``: training cutoffs per user, or None for every usable
    cutoff of the train part (65,582 instead of 2,584 training requests on ML-100K).
    """
    if list_length < 1:
        raise ValueError(f"list_length must be >= 1, got {list_length}")
    timelines = user_timelines(ratings)
    movies, users = ratings.movies, ratings.users
    items = {item_id: movie.item for item_id, movie in movies.items() if movie.year is not None}
    train: list[RecExample] = []
    val: list[RecExample] = []
    test: list[RecExample] = []
    for timeline in timelines:
        user = timeline.user_id
        for cutoff, window_end in training_cutoffs(timeline, train_cuts_per_user, min_history):
            example = _example(timeline, movies, items, users, "train", cutoff, window_end, list_length,
                               f"ml-100k/train/user-{user}/cut-{cutoff}")
            if example is not None:
                train.append(example)
        example = _example(timeline, movies, items, users, "val", timeline.train_end, timeline.val_end, list_length,
                           f"ml-100k/val/user-{user}")
        if example is not None:
            val.append(example)
        example = _example(timeline, movies, items, users, "test", timeline.val_end, len(timeline.item_ids),
                           list_length, f"ml-100k/test/user-{user}")
        if example is not None:
            test.append(example)
    conversations = MovieLensConversations(
        ratings=ratings,
        timelines=timelines,
        catalog=build_catalog(movies),
        train=train,
        val=val,
        test=test,
        list_length=list_length,
        num_item_columns=int(max(movies)) + 1,
    )
    conversations.statistics = movielens_statistics(conversations)
    return conversations


def _mean(values: list[int]) -> float:
    return round(float(np.mean(values)), 2) if values else 0.0


def movielens_statistics(conversations: MovieLensConversations) -> dict[str, Any]:
    ratings = conversations.ratings
    statistics: dict[str, Any] = {
        "source": SOURCE_NAME,
        "files": f"{ratings.directory} ({ratings.file_format})",
        "fingerprint": ratings.fingerprint,
        "users": len(conversations.timelines),
        "items": len(ratings.movies),
        "catalog_items": len(conversations.catalog),
        "interactions": ratings.num_interactions,
        "liked_fraction": round(float(np.mean(ratings.ratings >= LIKED_RATING)), 4),
        "split_interactions": {
            "train": sum(timeline.num_train for timeline in conversations.timelines),
            "val": sum(timeline.num_val for timeline in conversations.timelines),
            "test": sum(timeline.num_test for timeline in conversations.timelines),
        },
        "list_length": conversations.list_length,
    }
    for name, examples in (("train", conversations.train), ("val", conversations.val), ("test", conversations.test)):
        statistics[f"{name}_examples"] = len(examples)
        statistics[f"{name}_mean_history"] = _mean([len(example.history_item_ids) for example in examples])
        statistics[f"{name}_mean_groundtruth"] = _mean([len(example.groundtruth) for example in examples])
    return statistics


def format_statistics(statistics: dict[str, Any]) -> str:
    """A few readable lines."""
    split = statistics.get("split_interactions", {})
    return (
        f"[data] {statistics['source']}: {statistics['users']} users, {statistics['items']} items "
        f"({statistics['catalog_items']} in catalog), {statistics['interactions']} interactions, "
        f"liked (rating >= 4) {statistics['liked_fraction']:.1%}\n"
        f"[data] interactions train/val/test = {split.get('train')}/{split.get('val')}/{split.get('test')}\n"
        + "".join(
            f"[data] {name}: {statistics[f'{name}_examples']} examples, mean history "
            f"{statistics[f'{name}_mean_history']}, mean |GT| {statistics[f'{name}_mean_groundtruth']}\n"
            for name in ("train", "val", "test")
        )
    ).rstrip("\n")


def load_movielens(
    data_dir: str | Path | None = None,
    list_length: int = 10,
    train_cuts_per_user: int | None = 3,
    download: bool = True,
    progress: bool = True,
    verify: bool = True,
) -> MovieLensConversations:
    """Load ML-100K (``load_movielens_ratings``) and build the conversational set (``build_conversations``)."""
    ratings = load_movielens_ratings(data_dir, download=download, progress=progress, verify=verify)
    return build_conversations(ratings, list_length=list_length, train_cuts_per_user=train_cuts_per_user)
