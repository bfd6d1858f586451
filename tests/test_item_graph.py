"""Item-attribute graph: a tiny hand-made .kg/.link fixture with hand-computed answers, the genres-only
fallback, and (with $RECRL_DATA_DIR) the real ML-100K graph against a plain re-reading of its files."""

import os
from pathlib import Path

import pytest

from experiments.data.common import DataError
from experiments.data.item_graph import entity_display, load_item_graph
from experiments.data.movielens import read_movielens_directory

SHARED_DATA = Path(os.environ.get("RECRL_DATA_DIR") or "/nonexistent-recrl-data")
needs_movielens = pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.kg").is_file(),
                                     reason="ML-100K knowledge graph not found under $RECRL_DATA_DIR")

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t10\n1\t2\t4\t11\n1\t3\t3\t12\n"
ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tHeat\t1995\tDrama Comedy\n2\tUp\t2009\tDrama\n3\tAlien\t1979\tHorror unknown\n")
LINK = "item_id:token\tentity_id:token\n1\tm.a\n2\tm.b\n"
KG = ("head_id:token\trelation_id:token\ttail_id:token\n"
      "m.a\tfilm.film.directed_by\tm.d1\n"
      "m.a\tfilm.film.actor\tm.x2\n"
      "m.a\tfilm.film.actor\tm.x1\n"
      "m.a\tfilm.film.written_by\tg.w1\n"
      "m.b\tfilm.film.actor\tm.x1\n"
      "m.b\tfilm.film.directed_by\tm.d1\n"
      "m.b\tfilm.film.language\tm.en\n"          # not counted (coarse)
      "m.d1\tfilm.director.film\tm.a\n"          # inverse relation: not counted
      "m.z\tfilm.film.actor\tm.x3\n")            # film not linked to an item


def write_fixture(root: Path, knowledge_graph: bool = True) -> Path:
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    (folder / "ml-100k.inter").write_text(INTER)
    (folder / "ml-100k.item").write_text(ITEM)
    if knowledge_graph:
        (folder / "ml-100k.link").write_text(LINK)
        (folder / "ml-100k.kg").write_text(KG)
    return folder


def test_attributes_shared_attributes_and_statistics(tmp_path):
    write_fixture(tmp_path)
    graph = load_item_graph(tmp_path, verify=False)
    assert graph.attributes(1) == {"genre:Drama", "genre:Comedy", "director:d1", "actor:x1", "actor:x2",
                                   "writer:g.w1"}
    assert graph.attributes(2) == {"genre:Drama", "director:d1", "actor:x1"}
    assert graph.attributes(3) == {"genre:Horror"}  # not linked; the "unknown" genre is not an attribute
    assert graph.shared_attributes(1, 2) == {"genre:Drama", "director:d1", "actor:x1"}
    assert graph.shared_attributes(2, 3) == frozenset()
    assert graph.statistics() == {
        "items": 3, "items_with_kg_facts": 2, "mean_attributes_per_item": round(10 / 3, 2),  # (6 + 3 + 1) / 3
        "distinct_attributes": 7, "note": f"genres and knowledge graph from {tmp_path / 'ml-100k'}"}
    with pytest.raises(KeyError, match="item 99 is not in the item graph"):
        graph.attributes(99)


def test_describe_is_one_deterministic_line(tmp_path):
    graph = load_item_graph(read_movielens_directory(write_fixture(tmp_path), verify=False), verify=False)
    # actor x1 has 2 films, x2 one: x1 first; round-robin director, actor, writer, then the second actor
    assert graph.describe(1) == "Heat (1995); genres: Comedy, Drama; director: d1; actors: x1, x2; writer: g.w1"
    assert graph.describe(1, max_facts=2) == "Heat (1995); genres: Comedy, Drama; director: d1; actor: x1"
    assert graph.describe(1, max_facts=0) == "Heat (1995); genres: Comedy, Drama"
    assert graph.describe(3) == "Alien (1979); genres: Horror"
    with pytest.raises(ValueError, match="max_facts"):
        graph.describe(1, max_facts=-1)
    assert entity_display("m.0bln8") == "0bln8" and entity_display("g.11b6") == "g.11b6"


def test_genres_only_without_knowledge_graph(tmp_path):
    folder = write_fixture(tmp_path, knowledge_graph=False)
    graph = load_item_graph(tmp_path, verify=False)
    assert graph.attributes(1) == {"genre:Drama", "genre:Comedy"}
    assert graph.items_with_kg_facts == 0 and graph.note.startswith("genres only")
    (folder / "ml-100k.link").write_text(LINK)
    with pytest.raises(DataError, match=r"ml-100k\.kg: missing while ml-100k\.link is present"):
        load_item_graph(tmp_path, verify=False)


def test_fixture_fails_verification(tmp_path):
    folder = write_fixture(tmp_path)
    ratings = read_movielens_directory(folder, verify=False)
    with pytest.raises(DataError, match=r"ml-100k\.link: found 2 links, but MovieLens-100K has 1,598 links"):
        load_item_graph(ratings)


@needs_movielens
def test_real_graph_matches_the_files():
    graph = load_item_graph(SHARED_DATA)
    folder = SHARED_DATA / "ml-100k"
    link = dict(line.split("\t") for line in (folder / "ml-100k.link").read_text().splitlines()[1:])
    triples = [line.split("\t") for line in (folder / "ml-100k.kg").read_text().splitlines()[1:]]
    kinds = {"film.film.directed_by": "director", "film.film.actor": "actor", "film.film.written_by": "writer",
             "film.film.produced_by": "producer", "film.film.cinematography": "cinematographer",
             "film.film.production_companies": "company", "film.film.subjects": "subject",
             "film.film.genre": "freebase_genre"}
    toy_story = link["1"]
    expected = {f"{kinds[relation]}:{tail.removeprefix('m.')}" for head, relation, tail in triples
                if head == toy_story and relation in kinds}
    expected |= {"genre:Animation", "genre:Children's", "genre:Comedy"}
    assert graph.attributes(1) == expected
    linked_with_facts = {head for head, relation, _ in triples if relation in kinds}
    statistics = graph.statistics()
    assert statistics["items"] == 1682
    assert statistics["items_with_kg_facts"] == sum(entity in linked_with_facts for entity in link.values())
    assert graph.describe(1).startswith("Toy Story (1995); genres: Animation, Children's, Comedy; director: ")
    assert graph.describe(1) == load_item_graph(SHARED_DATA).describe(1)
