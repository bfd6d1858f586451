"""ReRec rewards: answer extraction, dual-graph reward, RAAE line penalties, curriculum order.

ReRec (Huang et al., "ReRec: Reasoning-Augmented LLM-based Recommendation
Assistant via Reinforcement Fine-tuning", arXiv 2604.07851) fine-tunes an LLM
that reads a request plus a multiple-choice list of candidates, reasons in free
text and answers with ``\\boxed{Title (Year)}``.  Its official code is the verl
fork github.com/jiani-huang/ReRec (files named below).  This module holds the
pure parts, text and numbers in, numbers out; docs/rerec.md explains the
method and every choice made here.

Notation: G completions per prompt; completion i chose item p_i (or nothing),
the target is gt; r_i is the sequence reward of completion i.

Answer and matching
-------------------
* answer = the stripped content of the first balanced ``\\boxed{...}``
  (``first_boxed``); no box -> None.
* Two names denote the same item when their normal forms agree: NFKC, case
  folding, whitespace collapsed; a trailing ``(YYYY)`` is split off as the year
  (the official code's year pattern).  ``match_candidate`` accepts the exact
  title with year, or a year-less title when exactly one candidate has it.

Rewards (paper: "Dual-Graph Enhanced Reward Shaping"; code: verl/utils/reward_score/rec.py)
------------------------------------------------------------------------------------------
* NDCG@1 with one relevant item:    NDCG@1 = 1[p_i = gt]
* query alignment (item-attribute graph):  S_QAS = |R_p ∩ R_gt| / |R_gt|
* preference alignment (CF embeddings M):  S_PAS = cos(M(p), M(gt))
* paper form:  r = NDCG@1 + w1 S_QAS + w2 S_PAS
* code form:   r = 0.1 format + 1.0 rec + 0.01 qas + 0.01 second,
  format = +0.5 with a box / -0.5 without, rec = NDCG@1 with a box / -0.5 without.

An answer that names no candidate (garbage in the box, a title not offered, an
ambiguous year-less title) is counted as a miss: NDCG@1 = 0 and, being no item of
either graph, S_QAS = S_PAS = 0; it keeps the code form's format credit
(paper form 0, code form +0.05).  No box: paper form 0, code form -0.55.

RAAE (paper: "Reasoning-aware Advantage Estimation"; code: verl/utils/reward_score/rec_token.py)
----------------------------------------------------------------------------------------------
Segments are raw ``"\\n"``-separated lines (the code's delimiter; blank lines
kept so line k is the same line as in ``rewards.lists.parse_list``).  When the
answer is wrong, a line that mentions the chosen item and contains no
``\\boxed`` is penalised: r_line = r - w_penalty |r| (= (1 - w_penalty) r, the
paper's formula, for r >= 0); every other line keeps r.  Correct answer or no
box: no line is penalised.

The online curriculum (d(x) = (1/G) Σ_i (1 - NDCG@1_i), drop d < tau, order the
rest easy to hard) orders prompts, not rewards: it lives with the strategy,
``algorithms/rerec.py``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

#: Code-form weights and values (jiani-huang/ReRec verl/utils/reward_score/rec.py ``compute_score``).
CODE_FORMAT_WEIGHT = 0.1
CODE_FORMAT_WITH_BOX = 0.5
CODE_FORMAT_WITHOUT_BOX = -0.5
CODE_RECOMMENDATION_WITHOUT_BOX = -0.5
CODE_QUERY_ALIGNMENT_WEIGHT = 0.01
CODE_SECOND_ALIGNMENT_WEIGHT = 0.01
#: RAAE penalty: min_token_reward_ratio 0.7 = 1 - w_penalty (scripts/train.sh and the
#: RAAERewardManager default; the lower-level compute_token_score default of 0.5 is not used).
DEFAULT_PENALTY_WEIGHT = 0.3

_BOX_OPEN = "\\boxed{"
_BOX_TOKENS = re.compile(r"\\boxed\{|[{}]")
_TRAILING_YEAR = re.compile(r"\s*\(([0-9]{4})\)\s*$")  # the official code's _create_flexible_pattern
_WHITESPACE = re.compile(r"\s+")


# ----------------------------------------------------------------------------- answer and names


def first_boxed(text: str) -> str | None:
    """The stripped content of the first ``\\boxed{...}`` in ``text``, or None when there is none.

    Braces nest: the box closes at the ``}`` that balances its ``{``, so
    ``\\boxed{A {B} C}`` gives ``"A {B} C"``.  "First" means the box whose
    ``\\boxed{`` comes first among the boxes that close; a box never closed
    is no box.  Whatever the content is (garbage, another box, empty) it is
    returned as is, stripped of surrounding whitespace.  One pass over the
    brace tokens: linear time.

    Differences from the official ``extract_recommendation`` (regex
    ``\\\\boxed{([^}]+)}``): there the content stops at the first ``}`` and an
    empty box ``\\boxed{}`` counts as no box; here braces balance and an empty
    box is a box whose answer names nothing.
    """
    if not isinstance(text, str):
        raise TypeError(f"first_boxed expects a str, got {type(text).__name__}")
    open_braces: list[tuple[int, bool]] = []  # (content start, opened by \boxed{)
    open_boxes = 0
    first: tuple[int, int] | None = None  # (content start, content end) of the earliest closed box
    for token in _BOX_TOKENS.finditer(text):
        if token.group() != "}":
            is_box = token.group() == _BOX_OPEN
            open_braces.append((token.end(), is_box))
            open_boxes += is_box
            continue
        if not open_braces:
            continue  # a stray closing brace
        start, is_box = open_braces.pop()
        if not is_box:
            continue
        open_boxes -= 1
        if first is None or start < first[0]:
            first = (start, token.start())
        if open_boxes == 0:
            break  # every box opened later starts later
    return None if first is None else text[first[0] : first[1]].strip()


def _normal_text(text: str) -> str:
    """NFKC, case folding, whitespace collapsed and stripped."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _title_and_year(name: str) -> tuple[str, int | None]:
    """``"Forrest Gump (1994)"`` -> ``("forrest gump", 1994)``; no trailing ``(YYYY)`` -> year None."""
    text = _normal_text(name)
    match = _TRAILING_YEAR.search(text)
    if match is None:
        return text, None
    return text[: match.start()].strip(), int(match.group(1))


def _same_item(first: tuple[str, int | None], second: tuple[str, int | None]) -> bool:
    """Same normal title, and the same year unless one of the two has none."""
    title_a, year_a = first
    title_b, year_b = second
    return title_a == title_b and (year_a is None or year_b is None or year_a == year_b)


def match_candidate(answer: str | None, candidates: Sequence[str]) -> int | None:
    """Index of the candidate that ``answer`` names, or None.

    Rules, on normal forms (NFKC, case-folded, whitespace collapsed, a trailing
    ``(YYYY)`` read as the year):

    1. the candidate whose title and year both equal the answer's;
    2. otherwise, when the answer has no year (or a candidate has none), the
       candidate with the same title, if exactly one has it;
    3. otherwise None: no answer (None), an empty box, garbage, a title not
       offered, a wrong year ("Psycho (1998)" when only "Psycho (1960)" is a
       candidate), or a year-less title two candidates share (remakes).

    Deviations from the official code (rec.py ``calculate_recommendation_metrics``),
    which compares exact, case-sensitive strings after splitting the box on
    ``";"`` and taking ``list(set(items))[:1]``, i.e. an arbitrary item of a
    multi-item box: here case, Unicode form and spacing do not matter, a
    year-less title counts when unambiguous, and a box holding several items
    names no candidate.

    Raises:
        TypeError: ``candidates`` is not a sequence of strings.
        ValueError: two candidates have the same normal form (the task must offer distinct items).
    """
    if isinstance(candidates, str) or not all(isinstance(candidate, str) for candidate in candidates):
        raise TypeError("candidates must be a sequence of 'Title (Year)' strings")
    keys = [_title_and_year(candidate) for candidate in candidates]
    first_index: dict[tuple[str, int | None], int] = {}
    for index, key in enumerate(keys):
        if key in first_index:
            raise ValueError(
                f"candidates {first_index[key]} ({candidates[first_index[key]]!r}) and {index} "
                f"({candidates[index]!r}) name the same item; offer distinct candidates"
            )
        first_index[key] = index
    if answer is None:
        return None
    answer_key = _title_and_year(answer)
    if not answer_key[0]:
        return None
    if answer_key in first_index:
        return first_index[answer_key]
    compatible = [index for index, key in enumerate(keys) if _same_item(answer_key, key)]
    return compatible[0] if len(compatible) == 1 else None


# ----------------------------------------------------------------------------- scores and rewards


def _check_index(name: str, value: object, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def ndcg_at_1(chosen_index: int | None, target_index: int) -> float:
    """NDCG@1 with one relevant item: DCG@1 / IDCG@1 = 1[chosen = target] / 1.

    ``chosen_index`` None (no box, or an answer naming no candidate) scores 0.
    Paper: NDCG@K in r_i; code: ``reward_func`` default k = 1.
    """
    _check_index("chosen_index", chosen_index, allow_none=True)
    _check_index("target_index", target_index, allow_none=False)
    return 1.0 if chosen_index == target_index else 0.0


def query_alignment(answer_attributes: Iterable[Hashable], target_attributes: Iterable[Hashable]) -> float:
    """S_QAS = |A ∩ T| / |T|: the share of the target's attribute neighbours (genre, actors,
    director, ... in the item-attribute graph) that the answer shares.  0 when T is empty.

    An answer that is no item of the graph has A = ∅ and scores 0.
    """
    answer_set, target_set = set(answer_attributes), set(target_attributes)
    if not target_set:
        return 0.0
    return len(answer_set & target_set) / len(target_set)


def preference_alignment(
    answer_vector: Sequence[float] | np.ndarray, target_vector: Sequence[float] | np.ndarray
) -> float:
    """S_PAS = cos(M(p), M(gt)) = <a, t> / (|a| |t|) between collaborative-filtering item
    embeddings (the paper uses a light graph CF model such as LightGCN).

    0 when either vector is zero (an answer that is no item has no embedding:
    pass a zero vector).

    Raises:
        ValueError: the vectors are not 1-D, differ in length, or hold non-finite values.
    """
    answer = np.asarray(answer_vector, dtype=np.float64)  # [D]
    target = np.asarray(target_vector, dtype=np.float64)  # [D]
    if answer.ndim != 1 or target.ndim != 1 or answer.shape != target.shape:
        raise ValueError(f"expected two 1-D vectors of equal length, got shapes {answer.shape} and {target.shape}")
    if not (np.isfinite(answer).all() and np.isfinite(target).all()):
        raise ValueError("embedding vectors must be finite")
    norms = float(np.linalg.norm(answer)) * float(np.linalg.norm(target))
    if norms == 0.0:
        return 0.0
    return float(np.dot(answer, target) / norms)


def _check_alignment_inputs(chosen_index: int | None, scores: Mapping[str, float]) -> dict[str, float]:
    checked = {name: _check_finite(name, value) for name, value in scores.items()}
    if chosen_index is None:
        for name, value in checked.items():
            if value != 0.0:
                raise ValueError(
                    f"{name} = {value} but the answer names no candidate: an answer outside the "
                    "candidates is no item of either graph, so its alignment scores are 0"
                )
    return checked


def paper_reward(
    chosen_index: int | None,
    target_index: int,
    query_alignment_score: float = 0.0,
    preference_alignment_score: float = 0.0,
    query_weight: float = CODE_QUERY_ALIGNMENT_WEIGHT,
    preference_weight: float = CODE_SECOND_ALIGNMENT_WEIGHT,
) -> float:
    """Paper form: r = NDCG@1 + w1 S_QAS + w2 S_PAS (arXiv 2604.07851, dual-graph reward shaping).

    The paper does not fix w1, w2 in the text available to us; the defaults are
    the official code's 0.01 and 0.01.  No box or an answer naming no candidate
    (``chosen_index`` None) scores 0: there is no format term in this form.

    Raises:
        ValueError: non-finite inputs, or non-zero alignment scores for ``chosen_index`` None.
    """
    scores = _check_alignment_inputs(
        chosen_index,
        {"query_alignment_score": query_alignment_score, "preference_alignment_score": preference_alignment_score},
    )
    w1 = _check_finite("query_weight", query_weight)
    w2 = _check_finite("preference_weight", preference_weight)
    return (
        ndcg_at_1(chosen_index, target_index)
        + w1 * scores["query_alignment_score"]
        + w2 * scores["preference_alignment_score"]
    )


def code_reward(
    has_box: bool,
    chosen_index: int | None,
    target_index: int,
    query_alignment_score: float = 0.0,
    second_alignment_score: float = 0.0,
) -> float:
    """Code form (rec.py ``compute_score`` with score_type format, recommendation, qas, ias):

        r = 0.1 format + 1.0 rec + 0.01 qas + 0.01 second
        format = +0.5 if a box exists else -0.5
        rec    = NDCG@1 if a box exists else -0.5

    So: correct 1.05 + shaped terms, wrong or no candidate 0.05 + shaped terms,
    no box -0.55.  ``second_alignment_score`` fills the slot the code calls
    "ias" (a second item-attribute service whose source is not public); pass
    S_PAS there for the paper's second graph.

    Raises:
        ValueError: ``chosen_index`` given without a box, non-finite scores, or non-zero
            alignment scores for an answer that names no candidate.
    """
    if not isinstance(has_box, (bool, np.bool_)):
        raise TypeError(f"has_box must be a bool, got {has_box!r}")
    if not has_box and chosen_index is not None:
        raise ValueError(f"chosen_index = {chosen_index} but has_box is False: only a boxed answer can choose")
    scores = _check_alignment_inputs(
        chosen_index,
        {"query_alignment_score": query_alignment_score, "second_alignment_score": second_alignment_score},
    )
    if has_box:
        format_score, recommendation = CODE_FORMAT_WITH_BOX, ndcg_at_1(chosen_index, target_index)
    else:
        _check_index("target_index", target_index, allow_none=False)
        format_score, recommendation = CODE_FORMAT_WITHOUT_BOX, CODE_RECOMMENDATION_WITHOUT_BOX
    return (
        CODE_FORMAT_WEIGHT * format_score
        + recommendation
        + CODE_QUERY_ALIGNMENT_WEIGHT * scores["query_alignment_score"]
        + CODE_SECOND_ALIGNMENT_WEIGHT * scores["second_alignment_score"]
    )


# ----------------------------------------------------------------------------- RAAE


def _names_of(name: str) -> set[str]:
    """The normal texts that mention an item: its full name and its title without the year."""
    return {text for text in (_normal_text(name), _title_and_year(name)[0]) if text}


def _mention_pattern(answer: str, target_title: str) -> tuple[re.Pattern[str], set[str]] | None:
    """A regex for whole-word mentions of the answer or the target, longest name first, and the
    names that mention only the answer (a name both share counts as the target's); None when
    the answer has no name of its own."""
    answer_names, target_names = _names_of(answer), _names_of(target_title)
    answer_only = answer_names - target_names
    if not answer_only:
        return None
    alternatives = "|".join(re.escape(text) for text in sorted(answer_names | target_names, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)"), answer_only


def penalised_lines(completion: str, answer: str | None, target_title: str) -> list[bool]:
    """RAAE penalty flags, one per raw ``"\\n"``-separated line of ``completion`` (blank lines included,
    so ``len(result) == completion.count("\\n") + 1``, the line indexing of ``rewards.lists.parse_list``).

    When ``answer`` (the first box's content) is wrong, line k is penalised iff
    it contains no ``\\boxed`` and mentions the chosen item: its title with the
    year or its title without a trailing ``(YYYY)``.  When the answer is
    correct, or there is no box (``answer`` None) or an empty one, nothing is
    penalised.  "Correct" means the answer names the target: same normal
    title, and the same year unless one side has none.

    Matching, on normal forms (NFKC, case-folded, whitespace collapsed):

    * case-insensitive.  The code is case-sensitive here ("the terminal" is
      missed) and, in its correctness test, compares the year-less answer
      *un-lowered* with the lower-cased target, so a correct answer written
      without its year ("Forrest Gump" for "Forrest Gump (1994)") is judged
      wrong and its own mentions penalised; this module fixes both.
    * whole words only: a mention must not be preceded or followed by a letter
      or digit, so answer "Alien" does not match "Aliens".
    * the target shadows the answer: mentions are found leftmost-longest among
      the answer's and the target's names, and only answer mentions count, so
      answer "Toy Story (1995)" does not flag "Toy Story 2 is it" when the target
      is "Toy Story 2 (1999)".  A year-less title both share (remakes) counts as
      the target's.

    Short titles that are common words ("Up", "Her") still flag lines that use
    the word; that is inherent to mention matching.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(target_title, str):
        raise TypeError(f"target_title must be a str, got {type(target_title).__name__}")
    lines = completion.split("\n")
    flags = [False] * len(lines)
    if answer is None or not _normal_text(answer):
        return flags
    if _same_item(_title_and_year(answer), _title_and_year(target_title)):
        return flags
    found = _mention_pattern(answer, target_title)
    if found is None:
        return flags
    pattern, answer_names = found
    for index, line in enumerate(lines):
        if not line or "\\boxed" in line:
            continue
        flags[index] = any(match.group() in answer_names for match in pattern.finditer(_normal_text(line)))
    return flags


def segment_rewards(
    sequence_reward: float, penalised: Sequence[bool] | np.ndarray, w_penalty: float = DEFAULT_PENALTY_WEIGHT
) -> np.ndarray:
    """Per-line rewards [L]: r - w_penalty |r| on penalised lines, r elsewhere.

    For r >= 0 this is the paper's r_s = (1 - w_penalty) r and the code's
    min_token_reward_ratio r with ratio 0.7 = 1 - 0.3.  For r < 0 the literal
    (1 - w) r would *raise* the reward of the wrong lines.  The code never gets
    there (with alignment scores >= 0 a boxed answer scores >= 0.05, and no box
    is never penalised), but the paper form can (a negative S_PAS), so the
    penalty is taken on |r| and always lowers.  r = 0 leaves nothing to scale:
    the lines keep 0.

    Raises:
        ValueError: w_penalty outside [0, 1], a non-finite reward, or ``penalised`` not 1-D.
    """
    reward = _check_finite("sequence_reward", sequence_reward)
    weight = _check_finite("w_penalty", w_penalty)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"w_penalty must be in [0, 1], got {weight}")
    flags = np.asarray(penalised, dtype=bool)  # [L]
    if flags.ndim != 1:
        raise ValueError(f"penalised must be a 1-D sequence of flags, got shape {flags.shape}")
    return np.where(flags, reward - weight * abs(reward), reward).astype(np.float64)  # [L]
