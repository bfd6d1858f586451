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
