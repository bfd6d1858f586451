"""Parse a generated recommendation list into items, one per raw line.

Positions
---------
The list is split on the raw newline character ``"\\n"`` and **position k is raw
line k** (0-based), blank lines included.  Rank-GRPO segments completion tokens
by counting newlines: the rank id of a token is the number of ``"\\n"`` before
it (docs/rank_grpo.md §1).  Keeping raw-line positions makes reward rank k and
token rank k the same line, so a blank or malformed line scores 0 at its own
rank instead of shifting the later items up (the official parser drops such
lines, which misaligns rewards and tokens; docs/rank_grpo.md §1).  A trailing
newline therefore creates one more (empty) position, exactly as it creates one
more token rank.  A carriage return before the newline ("\\r\\n") is ignored.

Line grammar
------------
A line is read in five steps::

    line    := marker* body
    marker  := ( bullet | number ) whitespace-or-end
    bullet  := one or more of  - * + > # • · – — ~       ("-", "*", "###", "--")
    number  := D "." | D ")" | D "]" | D "-"              ("1.", "12)", "3]", "1-")
             | "(" D ")" | "#" D | "#" D P | D " " Dash   ("(1)", "( 1 )", "#1", "#1.", "1 -")
    D       := 1 to 3 digits;   P := one of . ) : -;   Dash := one of - – —
    body    := Title [ "(" Year ")" | "[" Year "]" ] [ anything ]

1. Whitespace runs (any Unicode space) become one space; the line is trimmed.
2. Emphasis and quotes are removed **at the two ends of the line only**: runs
   of ``*``, ``_``, straight or typographic quotes and backticks
   ("**Heat (1995)**" -> "Heat (1995)").
3. Leading markers are removed, repeatedly.  **A marker counts only when
   whitespace (or the end of the line) follows it**, so a title that starts
   with digits or a bullet character keeps them: "1-900", "8-Bit Christmas",
   "11.22.63", "#Alive", "+1".  A bare number or a number with a colon is
   never a marker ("12 Angry Men", "8 1/2", "2001: A Space Odyssey").
   Consequently "1.Heat" is *not* numbering: it is the title "1.Heat", which
   no catalog knows, so it scores 0.  The target
   format has no numbering at all (docs/rank_grpo.md §1); the official parser
   also strips "1." or "1-" without a following space, which is exactly what
   destroys such titles.
4. Step 2 is repeated (for "- **Heat (1995)**").
5. The year is the first 4-digit number in parentheses or brackets,
   ``(1994)`` or ``[1994]``, spaces allowed inside; the title is the text
   before it, with the characters `` -–—:,;*_``, quotes and backticks
   stripped **at its two ends**.  Text after the year (" - a classic") is
   ignored.  Emphasis, quotes or dashes *inside* a title are kept
   ("M*A*S*H", "Don't F**k with Cats", "8-Bit Christmas").

A line with a title but no year gives ``Item(title, None)`` (it can never be a
hit, see ``rewards.catalog``); a line without any letter or digit in its title
gives ``item=None``.

Cost
----
Every step is one pass over the line: the markers are consumed by a single
match of one regular expression whose repetition never backtracks into an
earlier marker, and the end stripping is ``str.strip``.  Parsing is therefore
linear in the length of the text, also for adversarial lines such as one
megabyte of "1. 1. 1. ..." (tests/test_rewards_lists.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from rewards.catalog import Item

_WHITESPACE = re.compile(r"\s+")
_QUOTES = "\"'`“”‘’«»„"
#: Characters removed at the two ends of a line (emphasis and quotes), step 2.
_LINE_ENDS = " *_" + _QUOTES
#: Characters removed at the two ends of a title, step 5.
_TITLE_ENDS = " \t-–—:,;*_" + _QUOTES
_LEADING_MARKERS = re.compile(
    r"(?:"
    r"(?:"
    r"[-*+>#•·–—~]+"                  # bullets, blockquote and heading marks
    r"|\d{1,3}[.)\]-]"                # "1.", "1)", "1]", "1-"
    r"|\(\s*\d{1,3}\s*\)"             # "(1)"
    r"|\#\d{1,3}[.):-]?"              # "#1", "#1.", "#1:"
    r"|\d{1,3}\s[-–—]"                # "1 -"
    r")"
    r"(?:\s+|$)"                      # a marker must be followed by whitespace or the end
    r")*"
)
_YEAR = re.compile(r"[(\[]\s*(\d{4})\s*[)\]]")
_TITLE_CHARACTER = re.compile(r"\w")


@dataclass(frozen=True)
class ParsedLine:
    """One raw line of a generated list.

    Attributes:
        position: 0-based index of the raw ``\\n``-separated line (= its token rank id).
        raw: the raw line text (without the newline).
        item: the parsed ``Item``, or None for a blank line or a line without a title.
    """

    position: int
    raw: str
    item: Item | None


def parse_line(raw: str) -> Item | None:
    """Parse one line into an ``Item`` (grammar in the module docstring), or None."""
    text = _WHITESPACE.sub(" ", raw).strip(_LINE_ENDS)
    text = text[_LEADING_MARKERS.match(text).end():].strip(_LINE_ENDS)
    if not text:
        return None
    match = _YEAR.search(text)
    if match is None:
        title, year = text, None
    else:
        title, year = text[: match.start()], int(match.group(1))
    title = title.strip(_TITLE_ENDS)
    if not _TITLE_CHARACTER.search(title):
        return None
    return Item(title, year)


def parse_list(text: str) -> list[ParsedLine]:
    """Parse a generated list: one ``ParsedLine`` per raw ``\\n``-separated line.

    ``parse_list(text)[k].position == k`` always, and
    ``len(parse_list(text)) == text.count("\\n") + 1`` (an empty text is one empty line).
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_list expects a str, got {type(text).__name__}")
    return [
        ParsedLine(position=position, raw=line.rstrip("\r"), item=parse_line(line))
        for position, line in enumerate(text.split("\n"))
    ]


def format_item(item: Item) -> str:
    """``Title (Year)``, or just ``Title`` when the year is unknown."""
    return item.title if item.year is None else f"{item.title} ({item.year})"


def format_list(items: Iterable[Item]) -> str:
    """Items as the target completion format: ``Title (Year)`` lines joined by single
    newlines, no numbering and no trailing newline (docs/rank_grpo.md §1)."""
    return "\n".join(format_item(item) for item in items)
