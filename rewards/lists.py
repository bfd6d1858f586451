"""Parse a generated recommendation list into items, one per raw line.

Positions
---------
The list is split on the raw newline character ``"\\n"`` and **position k is raw
line k** (0-based), blank lines included.  Rank-GRPO segments completion tokens
by counting newlines: the rank id of a token is the number of ``"\\n"`` before
it (reference rank_grpo.md §1.1).  Keeping raw-line positions makes reward
rank k and token rank k the same line, so a blank or malformed line scores 0
at its own rank instead of shifting the later items up (the reference parser
drops such lines; §1.1 "alignment caveat").  A trailing newline therefore
creates one more (empty) position, exactly as it creates one more token rank.
A carriage return before the newline ("\\r\\n") is ignored.

Line grammar
------------
Each line is cleaned, then read as ``Title (Year)``:

* whitespace collapsed; ``**`` and ``__`` (markdown bold) removed;
* leading bullets and numbering removed, repeatedly: ``-``, ``*``, ``•``,
  ``+``, ``>``, ``#``, ``1.``, ``1)``, ``(1)``, ``1 -``, ``#1``, ``#1.``;
* surrounding quotes (straight or typographic) and backticks removed;
* the year is the first 4-digit number in parentheses or brackets,
  ``(1994)`` or ``[1994]``; the title is the text before it, with quotes and
  trailing separators (``-``, ``:``, ``,``) stripped; text after the year
  (trailing chatter such as " - a classic") is ignored;
* a line with a title but no year gives ``Item(title, None)`` (it can never be
  a hit, see ``rewards.catalog``); a line without any title character gives
  ``item=None``.

Every regular expression here is linear in the line length, so huge or
adversarial inputs cannot blow up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from rewards.catalog import Item

_WHITESPACE = re.compile(r"\s+")
_LEADING_MARKER = re.compile(
    r"^(?:"
    r"#\s*\d{1,3}(?:\s*[.):\-])?\s+"         # "#1 ", "#1. "
    r"|#\s*\d{1,3}[.):]\s*"                  # "#1."
    r"|[-*•·+>#–—~]+\s*"                     # bullets, blockquote, heading marks
    r"|\(\s*\d{1,3}\s*\)\s*"                 # "(1) "
    r"|\d{1,3}\s*[.)\]]\s*"                  # "1.", "1)", "1]"
    r"|\d{1,3}\s+-\s+"                       # "1 - "
    r"|\d{1,3}-\s*(?=\D)"                    # "1-" (the reference's numbering)
    r")"
)
_QUOTES = "\"'`“”‘’«»„"
_YEAR = re.compile(r"[(\[]\s*(\d{4})\s*[)\]]")
_TITLE_TRAILING = " \t-–—:,;*_" + _QUOTES
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


def _strip_leading_markers(text: str) -> str:
    while True:
        stripped = _LEADING_MARKER.sub("", text, count=1).lstrip()
        if stripped == text:
            return text
        text = stripped


def _strip_quotes(text: str) -> str:
    while len(text) >= 1 and (text[0] in _QUOTES or text[-1] in _QUOTES):
        text = text.strip(_QUOTES).strip()
    return text


def parse_line(raw: str) -> Item | None:
    """Parse one line into an ``Item`` (see the module docstring), or None."""
    text = _WHITESPACE.sub(" ", raw).strip()
    if not text:
        return None
    text = text.replace("**", "").replace("__", "")
    text = _strip_leading_markers(text)
    text = _strip_quotes(text)
    text = text.strip("*_ ")
    match = _YEAR.search(text)
    if match is None:
        title, year = text, None
    else:
        title, year = text[: match.start()], int(match.group(1))
    title = title.strip(_TITLE_TRAILING)
    title = _strip_quotes(title).strip(_TITLE_TRAILING)
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
    newlines, no numbering and no trailing newline (reference §1.1)."""
    return "\n".join(format_item(item) for item in items)
