"""Title forms, the catalog, and per-rank hit matching (docs/rank_grpo.md §2)."""

import os
from pathlib import Path

import pytest

from rewards.catalog import (
    Catalog, GroundTruthPool, Item, SeenSet, exact_title_form, move_trailing_article, normalize_title, rank_hits,
)
from rewards.lists import parse_list


def reddit_catalog_path() -> Path | None:
    """$RECRL_DATA_DIR/reddit-v2/catalog.tsv, or None when the variable is unset or the file absent."""
    data_dir = os.environ.get("RECRL_DATA_DIR")
    if not data_dir:
        return None
    path = Path(data_dir) / "reddit-v2" / "catalog.tsv"
    return path if path.is_file() else None


REDDIT_CATALOG = reddit_catalog_path()


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


def test_titles_with_digits_and_inner_emphasis_are_hits():
    titles = [Item("Don't F**k with Cats: Hunting an Internet Killer", 2019), Item("8-Bit Christmas", 2021),
              Item("11.22.63", 2016), Item("1-900", 1994), Item("2001: A Space Odyssey", 1968),
              Item("12 Angry Men", 1957), Item("8 1/2", 1963), Item("M*A*S*H", 1970)]
    catalog = Catalog(titles)
    text = "\n".join(f"{index + 1}. **{title}** ({year})" for index, (title, year) in enumerate(titles))
    assert rank_hits(parse_list(text), titles, [], catalog, 8) == [1] * 8


def test_remove_brackets_nested_and_unmatched():
    assert exact_title_form("Seven (Se7en) [director's cut]") == "seven"
    assert exact_title_form("A ((nested) note) B") == "a b"
    assert exact_title_form("Unclosed (note") == "unclosed note"
    assert exact_title_form("Stray) bracket") == "stray bracket"
    depth = 200_000  # one pass: a quadratic removal needs minutes here
    assert exact_title_form("(" * depth + "x" + ")" * depth + " The Heat") == "the heat"


# The Reddit-v2 catalog holds "Fall" and "The Fall" (2022), two different movies.
ARTICLE_PAIRS = Catalog([Item("Fall", 2022), Item("The Fall", 2022), Item("Watcher", 2022),
                         Item("The Watcher", 2022), Item("Shawshank Redemption, The", 1994), Item("Heat", 1995)])


def test_title_with_and_without_article_stay_distinct():
    catalog = ARTICLE_PAIRS
    assert len(catalog) == 6
    assert normalize_title("The Fall") == normalize_title("Fall")  # why the normal form alone is not enough
    assert catalog.lookup(Item("Fall", 2022)) == Item("Fall", 2022)
    assert catalog.lookup(Item("The Fall", 2022)) == Item("The Fall", 2022)
    assert catalog.lookup(Item("fall, the", 2021)) == Item("The Fall", 2022)
    assert catalog.lookup(Item("THE WATCHER", 2023)) == Item("The Watcher", 2022)
    assert catalog.lookup(Item("Watcher", 2022)) == Item("Watcher", 2022)
    # the article-free normal form is a fallback only when it names one catalog title
    assert catalog.lookup(Item("A Fall", 2022)) is None
    assert catalog.lookup(Item("Shawshank Redemption", 1994)) == Item("Shawshank Redemption, The", 1994)
    assert catalog.lookup(Item("The Heat", 1995)) == Item("Heat", 1995)
    assert catalog.title_key("Fall") == "fall" and catalog.title_key("The Fall") == "the fall"
    assert catalog.title_key("Shawshank Redemption") == "the shawshank redemption"
    assert catalog.years_of("the fall") == [2022] and catalog.years_of("A Fall") == []


def test_seen_and_groundtruth_keep_article_pairs_distinct():
    catalog = ARTICLE_PAIRS
    seen = SeenSet(["Fall"], title_key=catalog.title_key)
    assert Item("Fall", 2022) in seen and Item("The Fall", 2022) not in seen
    pool = GroundTruthPool([Item("The Fall", 2022)], title_key=catalog.title_key)
    assert not pool.consume(Item("Fall", 2022))
    assert pool.consume(Item("Fall, The", 2022))
    assert not pool.consume(Item("The Fall", 2022))  # consumed
    text = "Fall (2022)\nThe Fall (2022)\nFall (2022)"

    def run(groundtruth, seen=()):
        return rank_hits(parse_list(text), groundtruth, seen, catalog, 3)

    assert run([Item("The Fall", 2022)]) == [0, 1, 0]
    assert run([Item("Fall", 2022)]) == [1, 0, 0]
    assert run([Item("Fall", 2022), Item("The Fall", 2022)]) == [1, 1, 0]  # two items, not a duplicate
    assert run([Item("Fall", 2022), Item("The Fall", 2022)], seen=["Fall"]) == [0, 1, 0]
    assert run([Item("Fall", 2022), Item("The Fall", 2022)], seen=["The Fall"]) == [1, 0, 0]
    # the ground truth spelled without its article still finds the one catalog title it can name
    assert rank_hits(parse_list("The Shawshank Redemption (1994)"), [("Shawshank Redemption", "1994")], [],
                     catalog, 1) == [1]


def test_rank_hits_rejects_a_seen_set_keyed_without_the_catalog():
    with pytest.raises(ValueError, match="title_key=catalog.title_key"):
        rank_hits(parse_list("Heat (1995)"), [], SeenSet(["Fall"]), ARTICLE_PAIRS, 1)
    seen = SeenSet(["Heat"], title_key=ARTICLE_PAIRS.title_key)
    assert rank_hits(parse_list("Heat (1995)"), [Item("Heat", 1995)], seen, ARTICLE_PAIRS, 1) == [0]


def test_rank_hits_accepts_items():
    assert rank_hits([Item("Heat", 1995), None], [Item("Heat", 1995)], [], CATALOG, 3) == [1, 0, 0]


@pytest.mark.skipif(REDDIT_CATALOG is None, reason="set RECRL_DATA_DIR to a folder with reddit-v2/catalog.tsv")
def test_real_reddit_catalog_matching():
    catalog = Catalog.from_tsv(REDDIT_CATALOG)
    rows = [line.split("\t") for line in REDDIT_CATALOG.read_text(encoding="utf-8").splitlines()[1:]]
    assert len(rows) == 7404
    assert all(Item(title, int(year)) in catalog for title, year in rows)
    # 20 rows repeat another row of the same year up to punctuation, accents or case ("Adaptation." and
    # "Adaptation", "Amélie" and "Amelie", "Moulin Rouge!" twice, straight and typographic apostrophes);
    # the 3 pairs "X" / "The X" of one year are different movies and stay apart
    assert len(catalog) == 7404 - 20
    for title, year in (("Fall", 2022), ("The Fall", 2022), ("Father", 2020), ("The Father", 2020),
                        ("Watcher", 2022), ("The Watcher", 2022)):
        assert catalog.lookup(Item(title, year)) == Item(title, year)
    assert catalog.lookup(Item("Fall, The", 2022)) == Item("The Fall", 2022)
    assert catalog.lookup(Item("Amelie", 2001)) in (Item("Amelie", 2001), Item("Amélie", 2001))
    for title, year in (("8-Bit Christmas", 2021), ("11.22.63", 2016), ("12 Angry Men", 1957),
                        ("Don't F**k with Cats: Hunting an Internet Killer", 2019)):
        text = f"1. **{title}** ({year})"
        assert rank_hits(parse_list(text), [(title, str(year))], [], catalog, 1) == [1], text
    assert Item("'71", 2014) in catalog
    assert Item("10 Cloverfield Lane", 2016) in catalog
    assert Item("10 cloverfield lane", 2017) in catalog
    assert Item("10 Cloverfield Lane", 2019) not in catalog
    assert Item("A Movie That Does Not Exist At All", 2016) not in catalog
    text = "1. **10 Cloverfield Lane** (2016)\n\n- '71 (2014) - tense!\nNo year here"
    groundtruth = [("10 Cloverfield Lane", "2016"), ("'71", "2014")]
    assert rank_hits(parse_list(text), groundtruth, ["Zodiac"], catalog, 5) == [1, 0, 1, 0, 0]
