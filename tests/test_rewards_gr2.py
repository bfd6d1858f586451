"""GR2 reranking rewards: the output parser and the conditional reward against hand-derived values."""

import re

import pytest

from rewards.gr2 import (
    GR2RewardConfig,
    copies_input_order,
    order_agreement,
    format_ranking,
    gr2_reward,
    parse_ranking,
    rank_reward,
)

CANDIDATES = [f"<a_{i}><b_{i % 3}><c_{9 - i}>" for i in range(10)]  # pre-ranker order: rank i + 1


def move(candidates, pre_rank, new_rank):
    """The pre-ranked list with the item at 1-based `pre_rank` moved to 1-based `new_rank`."""
    ranking = list(candidates)
    item = ranking.pop(pre_rank - 1)
    ranking.insert(new_rank - 1, item)
    return ranking


def reference_reward(pre_rank, new_rank, num_candidates=10, alpha=0.1, conditional=True):
    """R_rank = (pre - re) / |D|; format bonus alpha iff R_rank > 0 or pre = 1 (always when unconditional)."""
    rank_part = (pre_rank - new_rank) / num_candidates
    if not conditional or rank_part > 0 or pre_rank == 1:
        return rank_part + alpha
    return rank_part


# (pre -> re, hand-computed conditional reward with |D| = 10, alpha = 0.1)
ORACLE = [
    (4, 1, 0.4),   # promotion: 0.3 + 0.1
    (4, 4, 0.0),   # order copy: no bonus (the naive sum would give 0.1: the hack)
    (4, 7, -0.3),  # demotion: no bonus
    (1, 1, 0.1),   # already first and kept first
    (1, 3, -0.1),  # literal condition: pre = 1 grants the bonus even on demotion (-0.2 + 0.1)
    (10, 1, 1.0),  # 0.9 + 0.1
]


@pytest.mark.parametrize("pre_rank, new_rank, expected", ORACLE)
def test_conditional_reward_oracle(pre_rank, new_rank, expected):
    ranking = move(CANDIDATES, pre_rank, new_rank)
    text = format_ranking("The user likes heist films; the target fits.", ranking)
    reward = gr2_reward(text, CANDIDATES, CANDIDATES[pre_rank - 1])
    assert reward == pytest.approx(expected, abs=1e-12)
    assert reward == pytest.approx(reference_reward(pre_rank, new_rank), abs=1e-12)


@pytest.mark.parametrize("pre_rank, new_rank, expected", [(4, 1, 0.4), (4, 4, 0.1), (4, 7, -0.2), (1, 3, -0.1)])
def test_unconditional_reward_pays_the_copy(pre_rank, new_rank, expected):
    text = format_ranking("reasoning", move(CANDIDATES, pre_rank, new_rank))
    reward = gr2_reward(text, CANDIDATES, CANDIDATES[pre_rank - 1], GR2RewardConfig(conditional=False))
    assert reward == pytest.approx(expected, abs=1e-12)
    assert reward == pytest.approx(reference_reward(pre_rank, new_rank, conditional=False), abs=1e-12)


def test_other_alpha_and_range():
    text = format_ranking("r", move(CANDIDATES, 6, 2))
    assert gr2_reward(text, CANDIDATES, CANDIDATES[5], GR2RewardConfig(format_weight=0.5)) == pytest.approx(0.9)
    assert rank_reward(10, 1, 10) == pytest.approx(0.9) and rank_reward(1, 10, 10) == pytest.approx(-0.9)
    assert rank_reward(4, 1, 10) == pytest.approx(0.3) and rank_reward(4, 7, 10) == pytest.approx(-0.3)
    with pytest.raises(ValueError, match=re.escape("reranked_rank=0 is outside 1..|D|")):
        rank_reward(3, 0, 10)


def test_copies_input_order():
    assert copies_input_order(list(CANDIDATES), CANDIDATES)
    assert not copies_input_order(move(CANDIDATES, 4, 1), CANDIDATES)
    assert not copies_input_order(None, CANDIDATES)
    copy_text = format_ranking("same order", CANDIDATES)
    assert copies_input_order(parse_ranking(copy_text, CANDIDATES), CANDIDATES)


def test_parse_tolerates_marker_in_reasoning_blank_lines_and_spaces():
    ranking = move(CANDIDATES, 2, 1)
    body = "\n".join(sid.replace("><", "> <") if i == 0 else f"  {sid}  " for i, sid in enumerate(ranking))
    text = "Ranking:\nI first wrote a draft.\n  Ranking:  \r\n" + body.replace("\n", "\r\n\n") + "\n\n"
    assert parse_ranking(text, CANDIDATES) == ranking


@pytest.mark.parametrize("text", [
    "I think item 4 is best.\n" + "\n".join(CANDIDATES),                          # no marker
    format_ranking("r", CANDIDATES[:9]),                                          # a candidate missing
    format_ranking("r", CANDIDATES[:9] + [CANDIDATES[0]]),                        # a repeat
    format_ranking("r", CANDIDATES[:9] + ["<a_99><b_0><c_0>"]),                   # not a candidate
    format_ranking("r", [f"{i + 1}. {sid}" for i, sid in enumerate(CANDIDATES)]),  # numbering
    format_ranking("r", CANDIDATES) + "\nHope this helps!",                       # trailing chatter
    "",
])
def test_unparseable_outputs_get_the_negative_reward(text):
    assert parse_ranking(text, CANDIDATES) is None
    assert gr2_reward(text, CANDIDATES, CANDIDATES[3]) == -1.0
    assert gr2_reward(text, CANDIDATES, CANDIDATES[3], GR2RewardConfig(unparseable_reward=-2.0)) == -2.0


def test_bad_inputs():
    text = format_ranking("r", CANDIDATES)
    with pytest.raises(ValueError, match=re.escape("got 9 candidates but the reward is configured for |D| = 10")):
        gr2_reward(format_ranking("r", CANDIDATES[:9]), CANDIDATES[:9], CANDIDATES[0])
    duplicated = CANDIDATES[:9] + [CANDIDATES[0]]
    with pytest.raises(ValueError, match="appear more than once"):
        gr2_reward(text, duplicated, CANDIDATES[0])
    with pytest.raises(ValueError, match="appear more than once"):
        parse_ranking(text, duplicated)
    with pytest.raises(ValueError, match="is not among the candidates"):
        gr2_reward(text, CANDIDATES, "<a_99><b_0><c_0>")
    with pytest.raises(ValueError, match="empty or contain whitespace"):
        parse_ranking(text, CANDIDATES[:9] + ["<a_1> <b_2>"])
    with pytest.raises(ValueError, match="candidate_sids is empty"):
        parse_ranking(text, [])


def test_order_agreement_counts_concordant_pairs():
    assert order_agreement(CANDIDATES, CANDIDATES) == 1.0
    assert order_agreement(CANDIDATES[::-1], CANDIDATES) == 0.0
    assert order_agreement(move(CANDIDATES, 4, 1), CANDIDATES) == pytest.approx(1 - 3 / 45)  # 3 of 45 pairs flip
    assert order_agreement(move(CANDIDATES, 1, 10), CANDIDATES) == pytest.approx(1 - 9 / 45)
    assert order_agreement(None, CANDIDATES) is None


@pytest.mark.parametrize("settings, key", [({"num_candidates": 1}, "num_candidates"),
                                           ({"format_weight": -0.1}, "format_weight"),
                                           ({"unparseable_reward": 0.5}, "unparseable_reward")])
def test_reward_config_checks(settings, key):
    with pytest.raises(ValueError, match=f"^{key}="):
        GR2RewardConfig(**settings)
