"""Item catalog, title forms and hit matching.

An *item* is a ``(title, year)`` pair, e.g. ``Item("The Shawshank Redemption", 1994)``.

Title forms
-----------
``exact_title_form`` writes a title in a spelling-independent form:

1. Unicode compatibility form (NFKD) with the accents removed ("Amélie" -> "Amelie").
2. Bracketed text is removed: every balanced ``(...)`` or ``[...]`` group,
   nested groups included ("Seven (Se7en)" -> "Seven"), because alternative
   titles and notes are written there.  An unmatched bracket stays (and
   becomes a space in step 4).  One pass over the text.
3. A trailing article written after a comma moves to the front
   ("Shawshank Redemption, The" -> "The Shawshank Redemption",
   "Femme Nikita, La" -> "La Femme Nikita").  The articles are
   ``TRAILING_ARTICLES`` (English, French, Italian, Spanish, German, ...).
4. Case folding, "&" -> "and", every other punctuation character -> a space,
   whitespace collapsed.

``normalize_title`` (the *normal form*) is the exact form with a leading
*English* article ("the", "a", "an") dropped, so "The Shawshank Redemption",
"Shawshank Redemption, The" and "Shawshank Redemption" share one normal form.
Foreign leading articles are kept ("La Femme Nikita" stays "la femme nikita"),
because words such as "die" or "el" also start titles where they are not
articles ("Die Hard").

Which titles name the same movie
--------------------------------
The normal form alone would merge different movies: the Reddit-v2 catalog
holds "Fall" and "The Fall" (2022), "Father" and "The Father" (2020), "Watcher"
and "The Watcher" (2022).  So titles are compared through the catalog's
*title key* (``Catalog.title_key``), tried in this order:

1. the exact form, when a catalog title (or alias) has it;
2. otherwise, the one catalog title whose normal form equals the title's
   normal form, when there is exactly one ("Shawshank Redemption" names
   "Shawshank Redemption, The");
3. otherwise the exact form itself (it names no catalog title; "A Fall" is
   ambiguous between "Fall" and "The Fall" and names neither).

``Catalog.lookup``, the seen set and the ground-truth pool all use this key, so
"Fall (2022)" and "The Fall (2022)" are two catalog items, a seen "Fall" does
not block "The Fall", and a ground-truth "The Fall" is not hit by "Fall".

Hits (the verifiable reward signal)
-----------------------------------
``rank_hits`` follows Rank-GRPO's per-rank relevance (docs/rank_grpo.md §2)
with positions kept.  For the recommendation at list position p (0-based,
p < n), in order:

1. no parsed item (blank or malformed line)      -> rel_p = 0
2. the item is in ``seen``                       -> rel_p = 0
3. the item is not in the catalog                -> rel_p = 0
4. the catalog item was already recommended      -> rel_p = 0   (duplicate)
5. an *unused* ground-truth occurrence has the same title key and a year
   within +-``year_tolerance`` (searched in the order y, y+1, y-1, y+2, y-2)
                                                 -> rel_p = 1, that occurrence is consumed
   otherwise                                     -> rel_p = 0

Ground truth is a multiset: each occurrence matches at most one recommendation.

Deviations from the official code, on purpose (docs/rank_grpo.md §2):

* The official code tests catalog membership and ``seen`` with exact,
  case-sensitive strings and an exact catalog year.  Here every comparison uses
  the title key, and catalog membership accepts a year within
  ``year_tolerance`` (default 2, the same tolerance as the ground-truth match)
  so that "The Shawshank Redemption (1995)" still names the catalog item
  "Shawshank Redemption, The (1994)".  ``Catalog(items, year_tolerance=0)``
  restores the exact year test.
* A ``seen`` entry with a year blocks that title with years within the
  tolerance; a ``seen`` entry without a year (Reddit-v2 ``seen_titles``) blocks
  the title in every year.
* An item without a year is never in the catalog (the requested format always
  carries a year, and the year disambiguates remakes).

All look-ups are dictionary (hash) look-ups keyed by title forms; no function
scans the catalog linearly.
"""

from __future__ import annotations

import csv
import functools
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol


class Item(NamedTuple):
    """One movie: its title as people write it and its release year (None when unknown)."""

    title: str
    year: int | None


#: Articles that catalogs write after a comma at the end of a title ("Matrix, The").
TRAILING_ARTICLES: frozenset[str] = frozenset(
    {
        "the", "a", "an",                      # English
        "les", "la", "le", "l'", "un", "une",  # French
        "il", "lo", "gli",                     # Italian
        "el", "los", "las", "una",             # Spanish
        "das", "der", "die", "ein", "eine",    # German
        "det", "den",                          # Scandinavian
    }
)
#: Leading articles dropped by the normal form (English only; see the module docstring).
LEADING_ARTICLES_DROPPED: frozenset[str] = frozenset({"the", "a", "an"})



def year_search_order(year_tolerance: int) -> list[int]:
    """Offsets 0, +1, -1, +2, -2, ... up to +-year_tolerance: the order in which years are
    tried when matching a catalog item or a ground-truth occurrence (docs/rank_grpo.md §2)."""
    offsets = [0]
    for distance in range(1, year_tolerance + 1):
        offsets.extend((distance, -distance))
    return offsets


_BRACKET_PAIRS = ("()", "[]")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.*\S),\s*(?P<article>[^\s,]+)\s*$")
_NON_WORD = re.compile(r"[^\w]+")


def move_trailing_article(title: str) -> str:
    """Move a trailing ", Article" to the front: "Shawshank Redemption, The" -> "The Shawshank Redemption".

    Only articles in ``TRAILING_ARTICLES`` move ("Corrina, Corrina" is kept).  An
    apostrophe article joins without a space ("Avventura, L'" -> "L'Avventura").
    """
    match = _TRAILING_ARTICLE.match(title)
    if match is None:
        return title
    article = match.group("article")
    if article.casefold() not in TRAILING_ARTICLES:
        return title
    separator = "" if article.endswith("'") else " "
    return f"{article}{separator}{match.group('body')}"


def _remove_bracketed(text: str) -> str:
    """Replace every balanced (...) or [...] group, nested ones included, by spaces.

    Each bracket kind is matched with a stack; every matched pair adds +1 to the
    depth from its opening bracket to its closing one, and characters at depth
    > 0 are removed.  One pass per bracket kind, so linear in the text length
    (deeply nested adversarial titles cannot blow up).
    """
    if "(" not in text and "[" not in text:
        return text
    depth_change = [0] * (len(text) + 1)
    for opening, closing in _BRACKET_PAIRS:
        open_positions: list[int] = []
        for position, character in enumerate(text):
            if character == opening:
                open_positions.append(position)
            elif character == closing and open_positions:
                depth_change[open_positions.pop()] += 1
                depth_change[position + 1] -= 1
    pieces: list[str] = []
    depth = 0
    for character, change in zip(text, depth_change):
        depth += change
        pieces.append(" " if depth > 0 else character)
    return "".join(pieces)


@functools.lru_cache(maxsize=1 << 16)
def exact_title_form(title: str) -> str:
    """Steps 1-4 of the module docstring: accents, brackets, trailing article, punctuation and case.

    >>> exact_title_form("Shawshank Redemption, The")
    'the shawshank redemption'
    >>> exact_title_form("Amélie (Fabuleux destin d'Amélie Poulain, Le)")
    'amelie'
    """
    text = unicodedata.normalize("NFKD", title)
    text = "".join(character for character in text if not unicodedata.combining(character))
    text = _remove_bracketed(text).strip()
    text = move_trailing_article(text)
    text = text.casefold().replace("&", " and ")
    text = _NON_WORD.sub(" ", text).replace("_", " ")
    return " ".join(text.split())


def _drop_leading_article(exact_form: str) -> str:
    article, _, rest = exact_form.partition(" ")
    return rest if rest and article in LEADING_ARTICLES_DROPPED else exact_form


@functools.lru_cache(maxsize=1 << 16)
def normalize_title(title: str) -> str:
    """The normal form of a title: the exact form without a leading English article.

    Pure function, memoised (bounded LRU cache) because catalogs, seen lists and
    ground truths normalise the same titles over and over.  Equal normal forms do
    *not* always mean the same movie; ``Catalog.title_key`` decides that.

    >>> normalize_title("Shawshank Redemption, The")
    'shawshank redemption'
    >>> normalize_title("  the SHAWSHANK   redemption ")
    'shawshank redemption'
    >>> normalize_title("Amélie (Fabuleux destin d'Amélie Poulain, Le)")
    'amelie'
    """
    return _drop_leading_article(exact_title_form(title))


def coerce_year(value: object) -> int | None:
    """A year from an int or a string such as "1994" or " 1994 "; None when there is none.

    Reddit-v2 stores ground-truth years as strings, the catalog as ints
    (docs/rank_grpo.md §6); both become ints here.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


class Catalog:
    """A set of items with hash look-ups by title key and year.

    Args:
        items: the catalog items.  Items without a year are ignored (they can
            never be matched, see the module docstring).  Items with the same
            exact title form and year are one item (the first one is kept).
        year_tolerance: an item (t, y) is in the catalog when some catalog item
            (t', y') has ``title_key(t) == exact_title_form(t')`` and
            ``|y - y'| <= year_tolerance``; the closest year wins (ties: the later year).
        aliases: optional extra titles naming a catalog title, e.g. the original
            foreign title ``{"Se7en": Item("Seven", 1995)}``.  An alias names
            every year of that title, and never overrides a catalog title of
            the same exact form.

    ``len(catalog)`` counts distinct items.
    """

    def __init__(
        self,
        items: Iterable[Item | Sequence],
        year_tolerance: int = 2,
        aliases: Mapping[str, Item] | None = None,
    ) -> None:
        if year_tolerance < 0:
            raise ValueError(f"year_tolerance must be >= 0, got {year_tolerance}")
        self.year_tolerance = year_tolerance
        self._items: list[Item] = []
        self._years_by_key: dict[str, dict[int, Item]] = {}     # exact form -> year -> item
        self._alias_keys: dict[str, str] = {}                   # exact form of an alias -> its title's key
        self._keys_by_normal_form: dict[str, set[str]] = {}     # normal form -> keys of catalog titles
        for raw in items:
            item = Item(str(raw[0]), coerce_year(raw[1]))
            if item.year is None:
                continue
            key = exact_title_form(item.title)
            years = self._years_by_key.setdefault(key, {})
            if item.year not in years:
                years[item.year] = item
                self._items.append(item)
            self._keys_by_normal_form.setdefault(_drop_leading_article(key), set()).add(key)
        for alias, item in (aliases or {}).items():
            canonical = self.lookup(item)
            if canonical is None:
                raise ValueError(f"alias {alias!r} names {item!r}, which is not in the catalog")
            alias_form = exact_title_form(alias)
            if alias_form in self._years_by_key:
                continue
            canonical_key = exact_title_form(canonical.title)
            self._alias_keys.setdefault(alias_form, canonical_key)
            self._keys_by_normal_form.setdefault(_drop_leading_article(alias_form), set()).add(canonical_key)

    @classmethod
    def from_tsv(cls, path: str | Path, year_tolerance: int = 2) -> "Catalog":
        """Read a ``title<TAB>year`` file with that header line (the Reddit-v2 catalog layout).

        Raises:
            FileNotFoundError: the file is missing.
            ValueError: a line has the wrong number of columns or a year that is not an integer
                (the message names the file and the line number).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"catalog file {path} does not exist; expected a 'title<TAB>year' file with a header line"
            )
        items: list[Item] = []
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None or [column.strip().lower() for column in header] != ["title", "year"]:
                raise ValueError(f"{path}:1: expected the header 'title<TAB>year', found {header!r}")
            for line_number, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != 2:
                    raise ValueError(
                        f"{path}:{line_number}: expected 2 tab-separated columns (title, year), "
                        f"found {len(row)}: {row!r}"
                    )
                year = coerce_year(row[1])
                if year is None:
                    raise ValueError(f"{path}:{line_number}: year {row[1]!r} is not an integer")
                items.append(Item(row[0], year))
        return cls(items, year_tolerance=year_tolerance)

    def title_key(self, title: str) -> str:
        """The key under which this catalog compares ``title`` (rules in the module docstring):
        its exact form when the catalog knows it, else the one catalog title with the same
        normal form, else its exact form."""
        exact_form = exact_title_form(title)
        if exact_form in self._years_by_key:
            return exact_form
        if exact_form in self._alias_keys:
            return self._alias_keys[exact_form]
        keys = self._keys_by_normal_form.get(_drop_leading_article(exact_form))
        if keys is not None and len(keys) == 1:
            return next(iter(keys))
        return exact_form

    def lookup(self, item: Item | Sequence) -> Item | None:
        """The catalog item that ``item`` names, or None (see the class docstring)."""
        year = coerce_year(item[1])
        if year is None:
            return None
        years = self._years_by_key.get(self.title_key(str(item[0])))
        if not years:
            return None
        for offset in year_search_order(self.year_tolerance):
            found = years.get(year + offset)
            if found is not None:
                return found
        return None

    def years_of(self, title: str) -> list[int]:
        """All catalog years of the title that ``title`` names, sorted."""
        return sorted(self._years_by_key.get(self.title_key(title), {}))

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            return False
        return self.lookup(item) is not None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def __repr__(self) -> str:
        return f"Catalog({len(self)} items, year_tolerance={self.year_tolerance})"


class _ParsedLineLike(Protocol):
    item: Item | None


class SeenSet:
    """Hash set of seen items: a seen (title, year) blocks that title within the year tolerance;
    a seen title without a year blocks the title in every year.

    ``title_key`` maps a title to the key titles are compared by: pass
    ``catalog.title_key`` (what ``rank_hits`` does) so that the seen set keeps the
    catalog's distinct titles distinct; the default, ``normalize_title``, is for use
    without a catalog.
    """

    def __init__(
        self,
        seen: Iterable[Item | Sequence | str],
        year_tolerance: int = 2,
        title_key: Callable[[str], str] = normalize_title,
    ) -> None:
        self.year_tolerance = year_tolerance
        self.title_key = title_key
        self._any_year: set[str] = set()
        self._years: dict[str, set[int]] = {}
        for entry in seen:
            if isinstance(entry, str):
                title, year = entry, None
            else:
                title, year = str(entry[0]), coerce_year(entry[1])
            key = title_key(title)
            if year is None:
                self._any_year.add(key)
            else:
                self._years.setdefault(key, set()).add(year)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            return False
        key = self.title_key(str(item[0]))
        if key in self._any_year:
            return True
        years = self._years.get(key)
        if not years:
            return False
        year = coerce_year(item[1])
        if year is None:
            return True
        return any(abs(year - seen_year) <= self.year_tolerance for seen_year in years)


class GroundTruthPool:
    """The ground truth as a multiset of unused occurrences, keyed by title key.

    ``consume(item)`` finds an unused occurrence with the same title key and a
    year within the tolerance (order y, y+1, y-1, y+2, y-2), marks it used and
    returns True; a ground-truth entry without a year matches any year.
    ``title_key`` as in ``SeenSet``.
    """

    def __init__(
        self,
        groundtruth: Iterable[Item | Sequence],
        year_tolerance: int = 2,
        title_key: Callable[[str], str] = normalize_title,
    ) -> None:
        self.year_tolerance = year_tolerance
        self.title_key = title_key
        # title key -> year (None = any) -> count of unused occurrences
        self._unused: dict[str, dict[int | None, int]] = {}
        self.size = 0
        for entry in groundtruth:
            key = title_key(str(entry[0]))
            year = coerce_year(entry[1])
            counts = self._unused.setdefault(key, {})
            counts[year] = counts.get(year, 0) + 1
            self.size += 1

    def consume(self, item: Item | Sequence) -> bool:
        counts = self._unused.get(self.title_key(str(item[0])))
        if not counts:
            return False
        year = coerce_year(item[1])
        candidates: list[int | None] = []
        if year is not None:
            candidates = [year + offset for offset in year_search_order(self.year_tolerance)]
        candidates.append(None)
        for candidate in candidates:
            if counts.get(candidate, 0) > 0:
                counts[candidate] -= 1
                return True
        return False


def rank_hits(
    parsed_lines: Sequence[_ParsedLineLike | Item | None],
    groundtruth: Iterable[Item | Sequence],
    seen: Iterable[Item | Sequence | str] | SeenSet,
    catalog: Catalog,
    n: int,
    year_tolerance: int = 2,
) -> list[int]:
    """Per-position hits rel in {0,1}^n for a parsed list (rules in the module docstring).

    Args:
        parsed_lines: one entry per list position; either ``ParsedLine`` objects
            from ``rewards.lists.parse_list`` (their ``.item`` is used), plain
            ``Item``s, or None for a position without an item.
        groundtruth: ground-truth items (a multiset, consumed in list order).
        seen: items or bare titles the user already mentioned or consumed, or a
            ``SeenSet`` built with ``title_key=catalog.title_key``.
        catalog: the item catalog; its ``title_key`` decides which titles are equal.
        n: list length N; positions >= n are ignored, missing positions are 0.
        year_tolerance: ground-truth and seen year tolerance (default 2).

    Returns:
        A list of n ints in {0, 1}.

    Raises:
        ValueError: ``n < 0``, or ``seen`` is a ``SeenSet`` keyed differently from the catalog.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if isinstance(seen, SeenSet):
        if seen.title_key != catalog.title_key:
            raise ValueError(
                "seen is a SeenSet that compares titles differently from the catalog; build it as "
                "SeenSet(seen, year_tolerance, title_key=catalog.title_key) or pass the seen items themselves"
            )
        seen_set = seen
    else:
        seen_set = SeenSet(seen, year_tolerance, catalog.title_key)
    pool = GroundTruthPool(groundtruth, year_tolerance, catalog.title_key)
    recommended: set[Item] = set()
    hits = [0] * n
    for position, entry in enumerate(parsed_lines[:n]):
        item = entry if (entry is None or isinstance(entry, tuple)) else entry.item
        if item is None or item in seen_set:
            continue
        canonical = catalog.lookup(item)
        if canonical is None or canonical in recommended:
            continue
        recommended.add(canonical)
        if pool.consume(item):
            hits[position] = 1
    return hits
