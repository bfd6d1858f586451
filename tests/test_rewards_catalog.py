"""Title normalisation, the catalog, and per-rank hit matching (rank_grpo.md §1.2)."""

from pathlib import Path

import pytest

from rewards.catalog import Catalog, Item, move_trailing_article, normalize_title, rank_hits
from rewards.lists import parse_list

REDDIT_CATALOG = Path("/work/shared/data/reddit-v2/catalog.tsv")


@pytest.mark.parametrize(
    "left, right",
    [
        ("Shawshank Redemption, The", "The Shawshank Redemption"),
        ("Shawshank Redemption, The", "shawshank   redemption"),
        ("Fish Called Wanda, A", "A Fish Called Wanda"),
        ("Femme Nikita, La", "La Femme Nikita"),
        ("Amélie", "Amelie"),
        ("Seven (Se7en)", "Seven"),
        ("Truth About Cats & Dogs, The", "The Truth About Cats and Dogs"),
        ("Star Wars: Episode IV - A New Hope", "star wars episode iv a new hope"),
        ("When Harry Met Sally...", "When Harry Met Sally"),
    ],
)
def test_normalize_title_equivalences(left, right):
    assert normalize_title(left) == normalize_title(right)


def test_normalize_title_keeps_distinctions():
    assert normalize_title("Die Hard") == "die hard"  # a German article word, not moved or dropped
    assert normalize_title("La Femme Nikita") != normalize_title("Femme Nikita")
    assert normalize_title("Corrina, Corrina") == "corrina corrina"
    assert normalize_title("The") == "the"


def test_move_trailing_article():
    assert move_trailing_article("Postino, Il") == "Il Postino"
    assert move_trailing_article("Corrina, Corrina") == "Corrina, Corrina"
    assert move_trailing_article("Avventura, L'") == "L'Avventura"


def test_catalog_membership_and_tolerance():
    catalog = Catalog([Item("Shawshank Redemption, The", 1994), Item("Dune", 1984), Item("Dune", 2021)])
    assert len(catalog) == 3
    assert Item("The Shawshank Redemption", 1994) in catalog
    assert Item("The Shawshank Redemption", 1996) in catalog
    assert Item("The Shawshank Redemption", 1997) not in catalog
    assert Item("The Shawshank Redemption", None) not in catalog
    assert catalog.lookup(Item("Dune", 2020)) == Item("Dune", 2021)
    assert catalog.lookup(Item("Dune", 1985)) == Item("Dune", 1984)
    exact = Catalog([Item("Heat", 1995)], year_tolerance=0)
    assert Item("Heat", 1995) in exact and Item("Heat", 1996) not in exact
    assert "Heat" not in exact and 3 not in exact
    assert catalog.years_of("dune") == [1984, 2021]


def test_catalog_aliases():
    catalog = Catalog([Item("Seven", 1995)], aliases={"Se7en": Item("Seven", 1995)})
    assert catalog.lookup(Item("Se7en", 1995)) == Item("Seven", 1995)
    with pytest.raises(ValueError):
        Catalog([Item("Seven", 1995)], aliases={"X": Item("Missing", 2000)})


def test_catalog_from_tsv_errors(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("title\tyear\nHeat\t1995\nDune\t2021\n")
    assert len(Catalog.from_tsv(good)) == 2
    bad_header = tmp_path / "bad_header.tsv"
    bad_header.write_text("name\tyear\nHeat\t1995\n")
    with pytest.raises(ValueError, match=r"bad_header.tsv:1"):
        Catalog.from_tsv(bad_header)
    bad_columns = tmp_path / "bad_columns.tsv"
    bad_columns.write_text("title\tyear\nHeat\t1995\nDune\n")
    with pytest.raises(ValueError, match=r"bad_columns.tsv:3: expected 2"):
        Catalog.from_tsv(bad_columns)
    bad_year = tmp_path / "bad_year.tsv"
    bad_year.write_text("title\tyear\nHeat\tnineteen\n")
    with pytest.raises(ValueError, match=r"bad_year.tsv:2: year"):
        Catalog.from_tsv(bad_year)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        Catalog.from_tsv(tmp_path / "missing.tsv")


CATALOG = Catalog([Item("Heat", 1995), Item("Alien", 1979), Item("Aliens", 1986), Item("Up", 2009),
                   Item("Dune", 1984), Item("Dune", 2021)])


def hits(text, groundtruth, seen=(), n=5):
    return rank_hits(parse_list(text), groundtruth, seen, CATALOG, n)


def test_rank_hits_positions_are_raw_lines():
    text = "Heat (1995)\n\ngarbage line\nAlien (1979)"
    assert hits(text, [Item("Heat", 1995), Item("Alien", 1979)]) == [1, 0, 0, 1, 0]


def test_rank_hits_rules():
    groundtruth = [Item("Heat", 1995), Item("Alien", 1979)]
    # seen beats ground truth
    assert hits("Heat (1995)", groundtruth, seen=[Item("Heat", None)]) == [0, 0, 0, 0, 0]
    assert hits("Heat (1995)", groundtruth, seen=["heat"]) == [0, 0, 0, 0, 0]
    assert hits("Heat (1995)", groundtruth, seen=[Item("Heat", 1960)]) == [1, 0, 0, 0, 0]
    # out of catalog
    assert hits("Heat 2 (1995)", [Item("Heat 2", 1995)]) == [0] * 5
    # duplicates score 0, even when the ground truth holds two copies
    assert hits("Heat (1995)\nheat (1995)", [Item("Heat", 1995)] * 2) == [1, 0, 0, 0, 0]
    # a multiset is consumed: two recommendations naming one catalog item count once
    assert hits("Dune (2021)\nDune (2020)", [Item("Dune", 2021)]) == [1, 0, 0, 0, 0]
    # two different catalog items with the same title match two ground-truth occurrences
    assert hits("Dune (2021)\nDune (1984)", [Item("Dune", 2021), Item("Dune", 1984)]) == [1, 1, 0, 0, 0]
    # year +-2 boundary
    assert hits("Heat (1997)", [Item("Heat", 1995)]) == [1, 0, 0, 0, 0]
    assert hits("Heat (1993)", [Item("Heat", 1995)]) == [1, 0, 0, 0, 0]
    assert hits("Heat (1998)", [Item("Heat", 1995)]) == [0] * 5
    # ground-truth years given as strings, or missing
    assert hits("Up (2009)", [("Up", "2009")]) == [1, 0, 0, 0, 0]
    assert hits("Up (2009)", [("Up", None)]) == [1, 0, 0, 0, 0]
    # truncation and padding to n
    assert hits("Heat (1995)\nAlien (1979)", groundtruth, n=1) == [1]
    assert hits("", groundtruth, n=3) == [0, 0, 0]


def test_rank_hits_accepts_items():
    assert rank_hits([Item("Heat", 1995), None], [Item("Heat", 1995)], [], CATALOG, 3) == [1, 0, 0]


@pytest.mark.skipif(not REDDIT_CATALOG.is_file(), reason="the Reddit-v2 catalog is not available")
def test_real_reddit_catalog_matching():
    catalog = Catalog.from_tsv(REDDIT_CATALOG)
    rows = [line.split("\t") for line in REDDIT_CATALOG.read_text(encoding="utf-8").splitlines()[1:]]
    assert len(rows) == 7404
    assert all(Item(title, int(year)) in catalog for title, year in rows)
    # 23 rows repeat another row up to normalisation ("X" and "The X" in one year)
    assert 7300 < len(catalog) <= 7404
    assert Item("'71", 2014) in catalog
    assert Item("10 Cloverfield Lane", 2016) in catalog
    assert Item("10 cloverfield lane", 2017) in catalog
    assert Item("10 Cloverfield Lane", 2019) not in catalog
    assert Item("A Movie That Does Not Exist At All", 2016) not in catalog
    text = "1. **10 Cloverfield Lane** (2016)\n\n- '71 (2014) - tense!\nNo year here"
    groundtruth = [("10 Cloverfield Lane", "2016"), ("'71", "2014")]
    assert rank_hits(parse_list(text), groundtruth, ["Zodiac"], catalog, 5) == [1, 0, 1, 0, 0]
