"""An item-attribute graph of MovieLens-100K: genres plus facts from RecBole's Freebase knowledge graph.

ReRec's query-alignment score S_QAS = |R_p ∩ R_gt| / |R_gt| compares the
attributes of a recommended item with those of the ground-truth item in an
item-attribute graph (movie - {genre, actor, director, ...}; arXiv 2604.07851,
dual-graph reward shaping; docs/rerec.md; ``rewards.rerec.query_alignment``).
``ItemGraph`` is that graph for ML-100K: ``attributes(item)`` is R_item.

Sources
-------
* ``ml-100k.item`` / ``u.item`` genres -> ``"genre:<name>"`` (e.g. ``"genre:Drama"``;
  the placeholder genre "unknown" is not an attribute).
* ``ml-100k.link`` maps an item id to a Freebase entity, ``ml-100k.kg`` holds
  (head, relation, tail) triples between Freebase entities (RecBole 1.2.1's
  ML-100K files; the GroupLens layout has neither, and the graph then holds
  genres only, with a ``note`` saying so).  A triple whose head is an item's
  entity and whose relation is one of ``KG_RELATION_KINDS`` gives that item
  the attribute ``"<kind>:<tail>"``:

  ==================================  ===================
  relation                            attribute kind
  ==================================  ===================
  film.film.directed_by               director
  film.film.actor                     actor
  film.film.written_by                writer
  film.film.produced_by               producer
  film.film.cinematography            cinematographer
  film.film.production_companies      company
  film.film.subjects                  subject
  film.film.genre                     freebase_genre
  ==================================  ===================

  Left out: the inverse relations (``film.director.film`` ...; on ML-100K
  they repeat the forward triples), ``film.film.language``,
  ``film.film.country`` and ``film.film.rating`` (coarse: English, the USA
  and the most common rating each cover 40-90% of the films, so sharing them
  says little), award nominations and wins (events, not what a film is made
  of or about), and ``film.film.sequel`` / ``prequel`` (links between two
  films, not attributes).

Entity names
------------
The knowledge graph has no names, only Freebase ids (``m.0bln8``); an entity is
displayed as its id without the ``m.`` prefix (``"actor:0bln8"``); ids of
another form (``g.11b...``) are kept whole.  Deterministic, but not readable.

Description
-----------
``describe`` is one line: ``Title (Year); genres: ...; director: ...; actors:
...; writer: ...; producer: ...``.  Facts are chosen round-robin over the kinds
director, actor, writer, producer (first of each, then second of each, ...) up
to ``max_facts``; within a kind, entities with more ML-100K films come first
(the graph has no billing order), ties by id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.data.common import DataError
from experiments.data.movielens import Movie, MovieLensRatings, load_knowledge_graph, load_movielens_ratings
from rewards.lists import format_item

KG_RELATION_KINDS = {
    "film.film.directed_by": "director",
    "film.film.actor": "actor",
    "film.film.written_by": "writer",
    "film.film.produced_by": "producer",
    "film.film.cinematography": "cinematographer",
    "film.film.production_companies": "company",
    "film.film.subjects": "subject",
    "film.film.genre": "freebase_genre",
}
GENRE_KIND = "genre"
DESCRIBED_KINDS = ("director", "actor", "writer", "producer")
KIND_LABELS = {"director": ("director", "directors"), "actor": ("actor", "actors"),
               "writer": ("writer", "writers"), "producer": ("producer", "producers")}
DEFAULT_MAX_FACTS = 6


def entity_display(entity_id: str) -> str:
    """A Freebase id as shown in attributes: ``"m.0bln8"`` -> ``"0bln8"``; other ids unchanged."""
    return entity_id[2:] if entity_id.startswith("m.") else entity_id


@dataclass(frozen=True)
class ItemGraph:
    """Item -> attributes (``"kind:value"`` strings); see the module docstring.

    Attributes:
        movies: item id -> ``Movie`` (titles, years, genres).
        item_attributes: item id -> its attributes (every item of ``movies`` has an entry).
        attribute_item_counts: attribute -> number of items that have it.
        items_with_kg_facts: number of items with at least one knowledge-graph attribute.
        note: how the graph was built (and why it holds genres only, when it does).
    """

    movies: dict[int, Movie]
    item_attributes: dict[int, frozenset[str]]
    attribute_item_counts: dict[str, int]
    items_with_kg_facts: int
    note: str

    def _require(self, item_id: int) -> None:
        if item_id not in self.item_attributes:
            raise KeyError(f"item {item_id} is not in the item graph ({len(self.item_attributes)} ML-100K items)")

    def attributes(self, item_id: int) -> frozenset[str]:
        """The attributes of one item, e.g. ``{"genre:Drama", "actor:0bln8", "director:04jspq"}``."""
        self._require(item_id)
        return self.item_attributes[item_id]

    def shared_attributes(self, first_item_id: int, second_item_id: int) -> frozenset[str]:
        """The attributes both items have."""
        return self.attributes(first_item_id) & self.attributes(second_item_id)

    def values(self, item_id: int, kind: str) -> list[str]:
        """The item's attribute values of one kind; most frequent in ML-100K first, ties by value."""
        prefix = kind + ":"
        found = [attribute for attribute in self.attributes(item_id) if attribute.startswith(prefix)]
        found.sort(key=lambda attribute: (-self.attribute_item_counts[attribute], attribute))
        return [attribute[len(prefix):] for attribute in found]

    def describe(self, item_id: int, max_facts: int = DEFAULT_MAX_FACTS) -> str:
        """One line: title (year), genres, and up to ``max_facts`` people (module docstring)."""
        if max_facts < 0:
            raise ValueError(f"max_facts must be >= 0, got {max_facts}")
        self._require(item_id)
        candidates = {kind: self.values(item_id, kind) for kind in DESCRIBED_KINDS}
        chosen: dict[str, list[str]] = {kind: [] for kind in DESCRIBED_KINDS}
        remaining = max_facts
        for round_index in range(max((len(values) for values in candidates.values()), default=0)):
            for kind in DESCRIBED_KINDS:
                if remaining > 0 and round_index < len(candidates[kind]):
                    chosen[kind].append(candidates[kind][round_index])
                    remaining -= 1
        parts = [format_item(self.movies[item_id].item)]
        genres = self.values(item_id, GENRE_KIND)
        if genres:
            parts.append("genres: " + ", ".join(sorted(genres)))
        for kind in DESCRIBED_KINDS:
            if chosen[kind]:
                singular, plural = KIND_LABELS[kind]
                parts.append(f"{singular if len(chosen[kind]) == 1 else plural}: {', '.join(chosen[kind])}")
        return "; ".join(parts)

    def statistics(self) -> dict[str, Any]:
        """Coverage: items, items with knowledge-graph facts, mean attributes per item, distinct attributes."""
        counts = [len(attributes) for attributes in self.item_attributes.values()]
        return {
            "items": len(counts),
            "items_with_kg_facts": self.items_with_kg_facts,
            "mean_attributes_per_item": round(sum(counts) / len(counts), 2) if counts else 0.0,
            "distinct_attributes": len(self.attribute_item_counts),
            "note": self.note,
        }


def build_item_graph(
    movies: dict[int, Movie], links: dict[int, str] | None, triples: list[tuple[str, str, str]] | None, note: str
) -> ItemGraph:
    """The graph from item genres and (optionally) the link table and triples."""
    attributes: dict[int, set[str]] = {
        item_id: {f"{GENRE_KIND}:{genre}" for genre in movie.genres if genre.casefold() != "unknown"}
        for item_id, movie in movies.items()
    }
    items_with_kg_facts: set[int] = set()
    if links is not None and triples is not None:
        items_of_entity: dict[str, list[int]] = {}
        for item_id, entity in links.items():
            if item_id in attributes:
                items_of_entity.setdefault(entity, []).append(item_id)
        for head, relation, tail in triples:
            kind = KG_RELATION_KINDS.get(relation)
            if kind is None or head not in items_of_entity:
                continue
            for item_id in items_of_entity[head]:
                attributes[item_id].add(f"{kind}:{entity_display(tail)}")
                items_with_kg_facts.add(item_id)
    item_attributes = {item_id: frozenset(values) for item_id, values in sorted(attributes.items())}
    counts: dict[str, int] = {}
    for values in item_attributes.values():
        for attribute in values:
            counts[attribute] = counts.get(attribute, 0) + 1
    return ItemGraph(dict(movies), item_attributes, counts, len(items_with_kg_facts), note)


def load_item_graph(source: str | os.PathLike | MovieLensRatings | None = None, verify: bool = True) -> ItemGraph:
    """The item graph of ML-100K.

    Args:
        source: loaded ratings (their folder is read for ``ml-100k.link`` / ``.kg``),
            or a data directory searched as by ``load_movielens_ratings`` (None: the
            default search).
        verify: check the record counts of the files read (``False`` for small
            hand-made fixtures only).

    Raises:
        DataError: only one of ``ml-100k.link`` and ``ml-100k.kg`` is present, or a file is malformed.
    """
    ratings = source if isinstance(source, MovieLensRatings) else load_movielens_ratings(
        source, progress=False, verify=verify)
    folder = Path(ratings.directory)
    link_path, kg_path = folder / "ml-100k.link", folder / "ml-100k.kg"
    present = [path.is_file() for path in (link_path, kg_path)]
    if all(present):
        links, triples = load_knowledge_graph(folder, verify=verify)
        return build_item_graph(ratings.movies, links, triples, f"genres and knowledge graph from {folder}")
    if any(present):
        missing, found = (kg_path, link_path) if present[0] else (link_path, kg_path)
        raise DataError(f"{missing}: missing while {found.name} is present; the knowledge graph needs both "
                        "ml-100k.link and ml-100k.kg (RecBole's ML-100K files): add it, or remove both")
    return build_item_graph(ratings.movies, None, None,
                            f"genres only: {folder} has no ml-100k.link / ml-100k.kg (e.g. the GroupLens layout)")
