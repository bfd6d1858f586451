"""ReRec rewards (rewards/rerec.py) against hand-computed values and numpy written here.

Oracles: code reward, QAS/PAS, RAAE line rewards and RAAE advantage (docs/rerec.md,
"Worked examples"), plus hand RAAE cases and bad inputs. The curriculum lives with the
strategy: tests/test_rerec.py.
"""

import unicodedata

import numpy as np
import pytest

from rewards.lists import parse_list
from rewards.rerec import (
    code_reward,
    first_boxed,
    match_candidate,
    ndcg_at_1,
    paper_reward,
    penalised_lines,
    preference_alignment,
    query_alignment,
    segment_rewards,
)

CANDIDATES = [
    "Forrest Gump (1994)",
    "The Terminal (2004)",
    "Cast Away (2000)",
    "Psycho (1960)",
    "Psycho (1998)",
    "Amélie (2001)",
]
FORREST, TERMINAL, CAST_AWAY, PSYCHO_1960, PSYCHO_1998, AMELIE = range(6)

# The worked RAAE example: the model infers Cast Away -> Tom Hanks, then boxes the wrong film.
WRONG_REASONING = "The film is Cast Away.\nTom Hanks also starred in The Terminal.\n\\boxed{The Terminal}"


# ----------------------------------------------------------------------------- first_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{Forrest Gump (1994)}", "Forrest Gump (1994)"),
        ("\\boxed{  Forrest Gump (1994)  }", "Forrest Gump (1994)"),
        ("\\boxed{A {B} C} then \\boxed{D}", "A {B} C"),          # nested braces kept
        ("\\boxed{First} and \\boxed{Second}", "First"),          # several boxes: the first
        ("\\boxed{x \\boxed{Inner}}", "x \\boxed{Inner}"),        # a box in a box: the outer one
        ("\\boxed{never closed \\boxed{Inner}", "Inner"),         # an unclosed box is no box
        ("} stray { \\boxed{Ok}", "Ok"),                          # stray braces around
        ("\\boxed{}", ""),                                        # an empty box is a box
        ("\\boxed{🤷 {no} idea}", "🤷 {no} idea"),                # garbage is returned as is
        ("\\boxed{Line one\nline two}", "Line one\nline two"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
        ("\\boxed Forrest Gump", None),
        ("", None),
    ],
)
def test_first_boxed(text, expected):
    assert first_boxed(text) == expected


def test_first_boxed_adversarial_input_is_linear():
    # 100,000 unclosed boxes then one closed one: a per-box rescan would be quadratic.
    text = "\\boxed{" * 100_000 + "\\boxed{Last}"
    assert first_boxed(text) == "Last"
    assert first_boxed("{" * 200_000) is None


def test_first_boxed_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        first_boxed(None)


# ----------------------------------------------------------------------------- match_candidate


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Forrest Gump (1994)", FORREST),
        ("forrest   GUMP (1994)", FORREST),      # case and spacing do not matter
        ("Forrest Gump(1994)", FORREST),         # nor the space before the year
        ("Forrest Gump", FORREST),               # year-less and unambiguous
        ("the terminal", TERMINAL),
        ("Psycho (1998)", PSYCHO_1998),
        ("Psycho", None),                        # year-less but two candidates share it
        ("Psycho (2001)", None),                 # a year no candidate has
        ("Forrest Gump (1995)", None),           # a wrong year names another film
        ("Titanic (1997)", None),                # not offered
        ("Forrest Gump (1994); Cast Away (2000)", None),  # several items name no single candidate
        ("", None),
        ("(1994)", None),
        (None, None),
    ],
)
def test_match_candidate(answer, expected):
    assert match_candidate(answer, CANDIDATES) == expected


def test_match_candidate_unicode_forms():
    decomposed = unicodedata.normalize("NFD", "AMÉLIE (2001)")
    assert decomposed != "AMÉLIE (2001)"
    assert match_candidate(decomposed, CANDIDATES) == AMELIE
    assert match_candidate("Die Straße (1923)", ["Die Strasse (1923)"]) == 0  # ß case-folds to ss


def test_match_candidate_bad_candidates():
    with pytest.raises(ValueError, match="same item"):
        match_candidate("Heat (1995)", ["Heat (1995)", "heat  (1995)"])
    with pytest.raises(TypeError, match="candidates"):
        match_candidate("Heat (1995)", "Heat (1995)")
    assert match_candidate("Heat (1995)", []) is None


# ----------------------------------------------------------------------------- scores


def test_ndcg_at_1():
    assert ndcg_at_1(3, 3) == 1.0
    assert ndcg_at_1(2, 3) == 0.0
    assert ndcg_at_1(None, 3) == 0.0
    assert ndcg_at_1(np.int64(3), 3) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        ndcg_at_1(-1, 3)
    with pytest.raises(TypeError, match="int"):
        ndcg_at_1(True, 1)


def test_query_alignment_oracle():
    target = {"Drama", "Tom Hanks", "R. Zemeckis"}
    answer = {"Drama", "Tom Hanks", "S. Spielberg"}
    assert query_alignment(answer, target) == pytest.approx(2 / 3)
    assert query_alignment(set(), target) == 0.0            # an answer that is no item
    assert query_alignment(answer, set()) == 0.0            # documented neutral value
    assert query_alignment(["Drama", "Drama"], ["Drama"]) == 1.0


def test_preference_alignment_against_numpy():
    rng = np.random.default_rng(0)
    answer, target = rng.normal(size=16), rng.normal(size=16)
    expected = float(answer @ target / np.sqrt((answer @ answer) * (target @ target)))
    assert preference_alignment(answer, target) == pytest.approx(expected, abs=1e-12)
    assert preference_alignment([3.0, 4.0], [4.0, 3.0]) == pytest.approx(24 / 25)
    assert preference_alignment([1.0, 0.0], [-2.0, 0.0]) == pytest.approx(-1.0)
    assert preference_alignment([0.0, 0.0], [1.0, 2.0]) == 0.0
    with pytest.raises(ValueError, match="equal length"):
        preference_alignment([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        preference_alignment([np.nan, 1.0], [1.0, 1.0])


def test_code_reward_oracle():
    # 0.1 * 0.5 + 1.0 * 1 + 0.01 * 0.5 + 0.01 * 0.8 = 1.063
    assert code_reward(True, FORREST, FORREST, 0.5, 0.8) == pytest.approx(1.063)
    # 0.05 + 0 + 0.005 + 0.002 = 0.057
    assert code_reward(True, TERMINAL, FORREST, 0.5, 0.2) == pytest.approx(0.057)
    # no box: 0.1 * (-0.5) - 0.5 = -0.55
    assert code_reward(False, None, FORREST) == pytest.approx(-0.55)
    # a box naming no candidate: format credit only
    assert code_reward(True, None, FORREST) == pytest.approx(0.05)


def test_paper_reward():
    # r = NDCG@1 + w1 S_QAS + w2 S_PAS with w1 = 0.2, w2 = 0.1: 0 + 0.2 * 2/3 + 0.1 * 24/25
    qas = query_alignment({"Drama", "Tom Hanks", "S. Spielberg"}, {"Drama", "Tom Hanks", "R. Zemeckis"})
    pas = preference_alignment([3.0, 4.0], [4.0, 3.0])
    assert paper_reward(TERMINAL, FORREST, qas, pas, 0.2, 0.1) == pytest.approx(0.2 * 2 / 3 + 0.1 * 0.96)
    assert paper_reward(FORREST, FORREST, 1.0, 1.0) == pytest.approx(1.02)  # default w1 = w2 = 0.01
    assert paper_reward(None, FORREST) == 0.0                              # no box or no candidate
    assert paper_reward(TERMINAL, FORREST, 0.0, -1.0, 0.2, 0.1) == pytest.approx(-0.1)


def test_reward_inputs_must_agree():
    with pytest.raises(ValueError, match="names no candidate"):
        paper_reward(None, FORREST, 0.5, 0.0)
    with pytest.raises(ValueError, match="names no candidate"):
        code_reward(True, None, FORREST, 0.0, 0.3)
    with pytest.raises(ValueError, match="has_box is False"):
        code_reward(False, FORREST, FORREST)
    with pytest.raises(ValueError, match="finite"):
        code_reward(True, FORREST, FORREST, float("nan"))
    with pytest.raises(TypeError, match="has_box"):
        code_reward("yes", FORREST, FORREST)


def test_end_to_end_answer_naming_no_candidate():
    completion = "Maybe a ship film.\n\\boxed{Titanic (1997)}"
    answer = first_boxed(completion)
    chosen = match_candidate(answer, CANDIDATES)
    assert (answer, chosen) == ("Titanic (1997)", None)
    assert ndcg_at_1(chosen, FORREST) == 0.0
    assert paper_reward(chosen, FORREST) == 0.0
    assert code_reward(answer is not None, chosen, FORREST) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- RAAE


def test_raae_oracle_wrong_answer():
    flags = penalised_lines(WRONG_REASONING, first_boxed(WRONG_REASONING), "Forrest Gump")
    assert flags == [False, True, False]  # line 3 holds the box: exempt
    np.testing.assert_allclose(segment_rewards(0.05, flags), [0.05, 0.035, 0.05])


def test_raae_oracle_correct_answer():
    flags = penalised_lines(WRONG_REASONING, "The Terminal", "The Terminal")
    assert flags == [False, False, False]
    np.testing.assert_allclose(segment_rewards(0.05, flags), [0.05, 0.05, 0.05])


def test_raae_advantage_oracle():
    # G = 5 sequence rewards; mean and unbiased std over the sequences (numpy here),
    # then a penalised line of a wrong response carries 0.7 * 0.05.
    sequence = np.array([1.05, 0.05, 0.05, 1.05, 0.05])
    mean, std = sequence.mean(), sequence.std(ddof=1)
    assert (mean, std) == (pytest.approx(0.45), pytest.approx(0.547723, abs=1e-6))
    np.testing.assert_allclose((sequence - mean) / std, [1.0954, -0.7303, -0.7303, 1.0954, -0.7303], atol=1e-4)
    penalised_reward = segment_rewards(0.05, [True])[0]
    assert (penalised_reward - mean) / std == pytest.approx(-0.7577, abs=1e-4)


def test_raae_wrong_answer_not_named_in_reasoning():
    completion = "The film is Cast Away.\nTom Hanks stars in it.\n\\boxed{The Terminal (2004)}"
    assert penalised_lines(completion, "The Terminal (2004)", "Forrest Gump (1994)") == [False, False, False]


def test_raae_year_stripped_and_full_mentions():
    completion = (
        "The Terminal (2004) is a Tom Hanks film.\n"   # full name
        "So is the terminal, set in an airport.\n"     # year-less, other case
        "Forrest Gump (1994) is another.\n"
        "\\boxed{The Terminal (2004)}"
    )
    assert penalised_lines(completion, "The Terminal (2004)", "Forrest Gump (1994)") == [True, True, False, False]


def test_raae_correct_answer_without_year_is_not_penalised():
    # The official code judges this answer wrong (its year-less test is not lower-cased).
    completion = "Forrest Gump fits.\n\\boxed{Forrest Gump}"
    assert penalised_lines(completion, "Forrest Gump", "Forrest Gump (1994)") == [False, False]


def test_raae_no_box_and_empty_box():
    completion = "The Terminal is good.\nNo answer."
    assert penalised_lines(completion, first_boxed(completion), "Forrest Gump (1994)") == [False, False]
    assert penalised_lines("The Terminal.\n\\boxed{}", "", "Forrest Gump (1994)") == [False, False]


def test_raae_several_boxes():
    completion = (
        "Cast Away leads to Tom Hanks.\n"
        "The Terminal is his.\n"
        "\\boxed{The Terminal (2004)}\n"
        "Wait, The Terminal is wrong: \\boxed{Forrest Gump (1994)}\n"
        "The Terminal again."
    )
    answer = first_boxed(completion)
    assert answer == "The Terminal (2004)"
    assert penalised_lines(completion, answer, "Forrest Gump (1994)") == [False, True, False, False, True]


def test_raae_whole_words_and_target_shadowing():
    # "Alien" must not flag "Aliens", the target.
    assert penalised_lines("Aliens is it.\nAlien came first.", "Alien (1979)", "Aliens (1986)") == [False, True]
    # a sequel's name that contains the wrong answer's name names the target
    completion = "Toy Story 2 is it.\nToy Story was first.\nToy Story 2 and Toy Story both."
    flags = penalised_lines(completion, "Toy Story (1995)", "Toy Story 2 (1999)")
    assert flags == [False, True, True]
    # a longer wrong answer that contains the target's name is still found
    flags = penalised_lines("Toy Story 2 is it.\nToy Story was first.", "Toy Story 2 (1999)", "Toy Story (1995)")
    assert flags == [True, False]
    # a remake: the shared year-less title counts as the target's, the full name as the answer's
    completion = "Psycho is Hitchcock's.\nPsycho (1998) is the remake."
    assert penalised_lines(completion, "Psycho (1998)", "Psycho (1960)") == [False, True]


def test_raae_line_indexing_matches_parse_list():
    completion = "\nThe Terminal.\n\n  \nthe terminal\n\\boxed{The Terminal}\n"
    flags = penalised_lines(completion, "The Terminal", "Cast Away")
    assert len(flags) == completion.count("\n") + 1 == len(parse_list(completion))
    assert flags == [False, True, False, False, True, False, False]


def test_raae_garbage_box_flags_lines_that_repeat_it():
    completion = "I have no idea.\nhonestly, I HAVE NO IDEA\n\\boxed{I have no idea}"
    answer = first_boxed(completion)
    assert match_candidate(answer, CANDIDATES) is None
    assert penalised_lines(completion, answer, "Forrest Gump (1994)") == [True, True, False]


def test_raae_empty_completion():
    assert first_boxed("") is None
    assert penalised_lines("", None, "Forrest Gump (1994)") == [False]
    assert penalised_lines("", "The Terminal", "Forrest Gump (1994)") == [False]
    assert segment_rewards(0.05, []).shape == (0,)


def test_raae_unicode():
    completion = (
        "🎬 " + unicodedata.normalize("NFD", "Amélie") + " est charmant.\n"
        "Le Fabuleux Destin.\n"
        "AMÉLIE (2001) encore\n"
        "\\boxed{Amélie (2001)}"
    )
    assert penalised_lines(completion, first_boxed(completion), "Forrest Gump (1994)") == [True, False, True, False]


def test_raae_ten_thousand_lines():
    lines = [("The Terminal is wrong here." if k % 3 == 0 else f"step {k}: thinking") for k in range(10_000)]
    lines.append("\\boxed{The Terminal (2004)}")
    flags = penalised_lines("\n".join(lines), "The Terminal (2004)", "Forrest Gump (1994)")
    expected = [k % 3 == 0 for k in range(10_000)] + [False]
    assert flags == expected
    rewards = segment_rewards(0.05, flags)
    assert rewards.shape == (10_001,)
    assert np.isclose(rewards[0], 0.035) and np.isclose(rewards[1], 0.05)


def test_segment_rewards_sign_and_bounds():
    np.testing.assert_allclose(segment_rewards(1.05, [True, False], w_penalty=0.3), [0.735, 1.05])
    # negative r: the penalty lowers it (-0.2 - 0.3 * 0.2), it never raises it to 0.7 * (-0.2)
    np.testing.assert_allclose(segment_rewards(-0.2, [True, False]), [-0.26, -0.2])
    np.testing.assert_allclose(segment_rewards(0.0, [True]), [0.0])
    np.testing.assert_allclose(segment_rewards(0.5, [True], w_penalty=0.0), [0.5])
    np.testing.assert_allclose(segment_rewards(0.5, [True], w_penalty=1.0), [0.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segment_rewards(0.5, [True], w_penalty=1.5)
    with pytest.raises(ValueError, match="finite"):
        segment_rewards(float("inf"), [True])
    with pytest.raises(ValueError, match="1-D"):
        segment_rewards(0.5, [[True]])
