"""The list parser: formats, positions, and a seeded fuzz of malformed outputs."""

import random

import pytest

from rewards.catalog import Item
from rewards.lists import format_list, parse_line, parse_list


@pytest.mark.parametrize(
    "line, expected",
    [
        ("Inception (2010)", Item("Inception", 2010)),
        ("1. Inception (2010)", Item("Inception", 2010)),
        ("1) Inception (2010)", Item("Inception", 2010)),
        ("#1 Inception (2010)", Item("Inception", 2010)),
        ("#1. Inception (2010)", Item("Inception", 2010)),
        ("(1) Inception (2010)", Item("Inception", 2010)),
        ("12. Inception (2010)", Item("Inception", 2010)),
        ("- Inception (2010)", Item("Inception", 2010)),
        ("* Inception (2010)", Item("Inception", 2010)),
        ("• Inception (2010)", Item("Inception", 2010)),
        ("**Inception** (2010)", Item("Inception", 2010)),
        ("- **Inception (2010)**", Item("Inception", 2010)),
        ("### 3. Inception (2010)", Item("Inception", 2010)),
        ('"Inception" (2010)', Item("Inception", 2010)),
        ("“Inception” (2010)", Item("Inception", 2010)),
        ('"Inception (2010)"', Item("Inception", 2010)),
        ("   Inception    (2010)   ", Item("Inception", 2010)),
        ("Inception (2010) - a mind-bending heist", Item("Inception", 2010)),
        ("Inception (2010): because you liked Memento (2000)", Item("Inception", 2010)),
        ("Inception [2010]", Item("Inception", 2010)),
        ("Inception ( 2010 )", Item("Inception", 2010)),
        ("Seven (Se7en) (1995)", Item("Seven (Se7en)", 1995)),
        ("2001: A Space Odyssey (1968)", Item("2001: A Space Odyssey", 1968)),
        ("300: Rise of an Empire (2014)", Item("300: Rise of an Empire", 2014)),
        ("1984 (1984)", Item("1984", 1984)),
        ("10 Things I Hate About You (1999)", Item("10 Things I Hate About You", 1999)),
        ("M*A*S*H (1970)", Item("M*A*S*H", 1970)),
        ("Amélie (2001)", Item("Amélie", 2001)),
        ("Inception", Item("Inception", None)),
        ("Inception (twenty ten)", Item("Inception (twenty ten)", None)),
        ("", None),
        ("   ", None),
        ("---", None),
        ("1.", None),
        ("(2010)", None),
    ],
)
def test_parse_line(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        # a title that starts with digits keeps them: a marker needs whitespace after it
        ("1-900 (1994)", Item("1-900", 1994)),
        ("8-Bit Christmas (2021)", Item("8-Bit Christmas", 2021)),
        ("11.22.63 (2016)", Item("11.22.63", 2016)),
        ("8 1/2 (1963)", Item("8 1/2", 1963)),
        ("12 Angry Men (1957)", Item("12 Angry Men", 1957)),
        ("3:10 to Yuma (2007)", Item("3:10 to Yuma", 2007)),
        ("50/50 (2011)", Item("50/50", 2011)),
        ("#Alive (2020)", Item("#Alive", 2020)),
        ("+1 (2013)", Item("+1", 2013)),
        ("1.Heat (1995)", Item("1.Heat", 1995)),
        ("1)Heat (1995)", Item("1)Heat", 1995)),
        # ... and loses only the numbering in front of it
        ("1. 11.22.63 (2016)", Item("11.22.63", 2016)),
        ("2) 8-Bit Christmas (2021)", Item("8-Bit Christmas", 2021)),
        ("10. 10 Cloverfield Lane (2016)", Item("10 Cloverfield Lane", 2016)),
        ("# 12 Angry Men (1957)", Item("12 Angry Men", 1957)),
        ("- 1-900 (1994)", Item("1-900", 1994)),
        ("3 - 300: Rise of an Empire (2014)", Item("300: Rise of an Empire", 2014)),
        # every numbering and bullet form, whitespace after it
        ("1) Heat", Item("Heat", None)),
        ("1] Heat (1995)", Item("Heat", 1995)),
        ("1- Heat (1995)", Item("Heat", 1995)),
        ("1 - Heat (1995)", Item("Heat", 1995)),
        ("1 – Heat (1995)", Item("Heat", 1995)),
        ("(1) Heat (1995)", Item("Heat", 1995)),
        ("( 1 ) Heat (1995)", Item("Heat", 1995)),
        ("#1 Heat", Item("Heat", None)),
        ("#1: Heat (1995)", Item("Heat", 1995)),
        ("- Heat", Item("Heat", None)),
        ("* Heat", Item("Heat", None)),
        ("+ Heat (1995)", Item("Heat", 1995)),
        ("> 1. Heat (1995)", Item("Heat", 1995)),
        ("1.\tHeat (1995)", Item("Heat", 1995)),
        ("1.\u00a0Heat (1995)", Item("Heat", 1995)),
        # emphasis is removed at the ends only
        ("**Heat (1995)**", Item("Heat", 1995)),
        ("**1. Heat (1995)**", Item("Heat", 1995)),
        ("__Heat__ (1995)", Item("Heat", 1995)),
        ("*Heat* (1995)", Item("Heat", 1995)),
        ("Heat **(1995)**", Item("Heat", 1995)),
        ("Don't F**k with Cats: Hunting an Internet Killer (2019)",
         Item("Don't F**k with Cats: Hunting an Internet Killer", 2019)),
        ("1. **Don't F**k with Cats** (2019)", Item("Don't F**k with Cats", 2019)),
        ("B*A*P*S (1997)", Item("B*A*P*S", 1997)),
        ("*M*A*S*H* (1970)", Item("M*A*S*H", 1970)),
        ("- **M*A*S*H** (1970)", Item("M*A*S*H", 1970)),
        ("1.", None),
        ("**", None),
        ("1. 2. 3.", None),
    ],
)
def test_parse_line_titles_with_digits_and_emphasis(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        ("1. " * 350_000 + "Heat (1995)", Item("Heat", 1995)),
        ('" ' * 500_000 + "Heat (1995)", Item("Heat", 1995)),
        ("* _ " * 250_000 + "Heat (1995)", Item("Heat", 1995)),
        ("(1) " * 250_000 + "Heat (1995)", Item("Heat", 1995)),
        ("1." * 500_000 + " (1995)", Item("1." * 500_000, 1995)),
        ("(" * 500_000 + "Heat" + ")" * 500_000, Item("(" * 500_000 + "Heat" + ")" * 500_000, None)),
        ("(" * 1_000_000, None),
    ],
    ids=["numbering", "quotes", "emphasis", "parenthesised-numbering", "numbering-without-space", "nested",
         "brackets"],
)
def test_megabyte_adversarial_line_parses(line, expected):
    """One megabyte of markers: a quadratic parser needs minutes here (seconds per 100 kB)."""
    assert len(line) >= 1_000_000
    assert parse_line(line) == expected


def test_megabyte_adversarial_list_keeps_positions():
    text = ("1. " * 1000 + "Heat (1995)\n") * 335
    assert len(text) >= 1_000_000
    parsed = parse_list(text)
    assert len(parsed) == 336
    assert all(line.item == Item("Heat", 1995) for line in parsed[:335]) and parsed[335].item is None


def test_positions_are_raw_lines_blank_lines_included():
    text = "Heat (1995)\n\n2. Alien (1979)\nSure, enjoy!\n"
    parsed = parse_list(text)
    assert [line.position for line in parsed] == [0, 1, 2, 3, 4]
    assert [line.item for line in parsed] == [
        Item("Heat", 1995), None, Item("Alien", 1979), Item("Sure, enjoy!", None), None
    ]
    assert parsed[2].raw == "2. Alien (1979)"


def test_crlf_and_empty():
    parsed = parse_list("Heat (1995)\r\nAlien (1979)\r")
    assert [line.item for line in parsed] == [Item("Heat", 1995), Item("Alien", 1979)]
    assert parsed[0].raw == "Heat (1995)"
    assert [(line.position, line.item) for line in parse_list("")] == [(0, None)]
    assert len(parse_list("\n\n\n")) == 4


def test_format_list_round_trip():
    items = [Item("Heat", 1995), Item("Alien", 1979)]
    text = format_list(items)
    assert text == "Heat (1995)\nAlien (1979)"
    assert [line.item for line in parse_list(text)] == items


def test_parse_list_rejects_non_text():
    with pytest.raises(TypeError):
        parse_list(None)


ALPHABET = (
    "abcXYZ 0123456789()[]{}*_#-•.:;,'\"“”‘’«»`~!?/\\|\t\r"
    "éüßçñøå中文日本語한국어😀🎬\u200b\u00a0\u2028\u0301"
)


def random_text(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return ""
    if kind == 1:
        return "\n" * rng.randrange(1, 50)
    if kind == 2:  # huge
        return ("Movie " + "(" * rng.randrange(1, 200) + "1999" + ")" * rng.randrange(0, 200) + "\n") * rng.randrange(100, 400)
    if kind == 3:  # nested parentheses, no years
        depth = rng.randrange(1, 60)
        return "\n".join("(" * depth + "Title" + ")" * rng.randrange(depth + 1) for _ in range(rng.randrange(1, 20)))
    if kind == 4:  # well-formed items with noise
        return "\n".join(
            f"{rng.choice(['', '1. ', '- ', '**', '#', '  '])}Title {index} ({rng.randrange(1000, 9999)})"
            f"{rng.choice(['', ' - great', '**', ' (((', ''])}"
            for index in range(rng.randrange(0, 30))
        )
    length = rng.randrange(0, 3000 if kind == 5 else 200)
    return "".join(rng.choice(ALPHABET + "\n" * 5) for _ in range(length))


def test_fuzz_parser_never_raises_and_keeps_positions():
    rng = random.Random(1234)
    for _ in range(1200):
        text = random_text(rng)
        parsed = parse_list(text)
        assert len(parsed) == text.count("\n") + 1
        for position, line in enumerate(parsed):
            assert line.position == position
            assert line.item is None or (isinstance(line.item.title, str) and line.item.title.strip())
            assert line.item is None or line.item.year is None or 1000 <= line.item.year <= 9999
