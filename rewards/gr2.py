"""GR2 reranking output format and its verifiable rewards (GR2, arXiv 2602.07774; docs/gr2.md).

Task: the policy reranks |D| pre-ranked candidates (|D| = 10 in GR2), each
written as its semantic ID (``models.semantic_ids``).  The candidates are given
in pre-ranker order, so the pre-rank of a candidate is its 1-based position in
the prompt's list.

Output format
-------------
A short reasoning, then a marker line, then every candidate SID once, best
first, one per line::

    The user watched three heist films; <a_4><b_1><c_9> is another.
    Ranking:
    <a_4><b_1><c_9>
    <a_0><b_7><c_2>
    ... (all |D| candidates)

Parsing rules (``parse_ranking``):

* the list starts after the **last** line whose stripped text is exactly
  ``Ranking:`` (so the reasoning may mention the word);
* each following non-blank line, with all whitespace removed, must be one of
  the candidate SIDs (blank lines are skipped; an SID contains no whitespace);
* the output parses only when these lines are a **permutation** of the
  candidates.  Everything else is unparseable (``None``): no marker, a line
  that is not a candidate SID (an unknown or hallucinated item, numbering,
  trailing chatter), a repeated candidate, or a missing candidate.  There are
  no partial lists: dropping candidates would let a policy skip the hard part
  of the task, and the rank of the target would be undefined.

Rewards (x* = the ground-truth next item, always among the candidates)
-----------------------------------------------------------------------
* rank reward   R_rank = (rank_pre(x*) - rank_re(x*)) / |D|,  ranks 1-based, so
  R_rank ∈ [-(|D|-1)/|D|, (|D|-1)/|D|]; promoting x* from 4 to 1 gives +0.3;
* format reward R_fmt = 1 if the output parses, else 0;
* unconditional R = R_rank + α R_fmt.  A policy can earn α for free by copying
  the input order (R_rank = 0), the reward hack GR2 reports;
* conditional   R = R_rank + α R_fmt  if R_rank > 0 or rank_pre(x*) = 1,
                R = R_rank            otherwise,
  so a copy earns 0 unless x* was already first.  Taken literally (as here),
  the condition grants α whenever rank_pre(x*) = 1, even when x* is demoted
  (1 -> 3 gives -0.2 + α); docs/gr2.md flags this.
* an unparseable output has no rank_re(x*) and gets ``unparseable_reward``
  (default -1, below the worst parseable reward -(|D|-1)/|D|).  This value is
  recrl's choice; GR2 does not state one.

α (``format_weight``) is not given in the material recrl had; 0.1 is a default.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

RANKING_MARKER = "Ranking:"


@dataclass(frozen=True)
class GR2RewardConfig:
    num_candidates: int = 10  # |D|
    format_weight: float = 0.1  # α
    conditional: bool = True  # False: R_rank + α R_fmt for every parseable output
    unparseable_reward: float = -1.0  # <= 0: a broken format never pays

    def __post_init__(self) -> None:
        for holds, key, allowed in [(self.num_candidates >= 2, "num_candidates", "must be >= 2 (|D|)"),
                                    (self.format_weight >= 0, "format_weight", "must be >= 0 (α)"),
                                    (self.unparseable_reward <= 0, "unparseable_reward",
                                     "must be <= 0 (a broken format must not pay)")]:
            if not holds:
                raise ValueError(f"{key}={getattr(self, key)!r}: {allowed}")


def _check_candidates(candidate_sids: Sequence[str], num_candidates: int | None = None) -> None:
    if num_candidates is not None and len(candidate_sids) != num_candidates:
        raise ValueError(
            f"got {len(candidate_sids)} candidates but the reward is configured for |D| = {num_candidates}; "
            "pad the pre-ranked list to |D| items or set GR2RewardConfig.num_candidates"
        )
    if not candidate_sids:
        raise ValueError("candidate_sids is empty; pass the pre-ranked candidate SIDs")
    bad = [sid for sid in candidate_sids if not isinstance(sid, str) or not sid or sid != "".join(sid.split())]
    if bad:
        raise ValueError(
            f"candidate SIDs {bad[:5]} are empty or contain whitespace; pass SID strings such as '<a_1><b_2><c_3>'"
        )
    repeated = [sid for sid, count in Counter(candidate_sids).items() if count > 1]
    if repeated:
        raise ValueError(f"candidate SIDs {repeated[:5]} appear more than once; each candidate must be a distinct item")


def format_ranking(reasoning: str, ranked_sids: Sequence[str]) -> str:
    """The target text for a ranking: reasoning, the marker line, one SID per line."""
    return "\n".join([reasoning.strip(), RANKING_MARKER, *ranked_sids])


def parse_ranking(text: str, candidate_sids: Sequence[str]) -> list[str] | None:
    """The reranked candidate SIDs, best first, or None when `text` is unparseable (module docstring)."""
    _check_candidates(candidate_sids)
    lines = text.splitlines()
    marker_lines = [index for index, line in enumerate(lines) if line.strip() == RANKING_MARKER]
    if not marker_lines:
        return None
    candidates = set(candidate_sids)
    ranking: list[str] = []
    for line in lines[marker_lines[-1] + 1 :]:
        sid = "".join(line.split())
        if not sid:
            continue
        if sid not in candidates or sid in ranking:
            return None
        ranking.append(sid)
    return ranking if len(ranking) == len(candidate_sids) else None


def rank_reward(pre_rank: int, reranked_rank: int, num_candidates: int) -> float:
    """R_rank = (rank_pre - rank_re) / |D| with 1-based ranks."""
    for name, rank in (("pre_rank", pre_rank), ("reranked_rank", reranked_rank)):
        if not 1 <= rank <= num_candidates:
            raise ValueError(f"{name}={rank} is outside 1..|D| = 1..{num_candidates} (ranks are 1-based)")
    return (pre_rank - reranked_rank) / num_candidates


def copies_input_order(ranking: Sequence[str] | None, candidate_sids: Sequence[str]) -> bool:
    """True when a parsed ranking repeats the pre-ranked order exactly (the reward hack); False for None."""
    return ranking is not None and list(ranking) == list(candidate_sids)


def order_agreement(ranking: Sequence[str] | None, candidate_sids: Sequence[str]) -> float | None:
    """Fraction of the |D|(|D|-1)/2 candidate pairs a parsed ranking keeps in the input order: 1 for a copy
    of the input order, 0 for its reverse, (Kendall's tau + 1) / 2 in general; None for an unparseable output."""
    if ranking is None:
        return None
    position = {sid: index for index, sid in enumerate(ranking)}
    order = [position[sid] for sid in candidate_sids]
    pairs = len(order) * (len(order) - 1) // 2
    if pairs == 0:
        return 1.0
    kept = sum(order[i] < order[j] for i in range(len(order)) for j in range(i + 1, len(order)))
    return kept / pairs


def gr2_reward(
    text: str, candidate_sids: Sequence[str], target_sid: str, config: GR2RewardConfig = GR2RewardConfig()
) -> float:
    """The GR2 reward of one completion (module docstring); `candidate_sids` in pre-ranker order."""
    _check_candidates(candidate_sids, config.num_candidates)
    if target_sid not in candidate_sids:
        raise ValueError(f"target {target_sid!r} is not among the candidates; GR2 reranks lists that contain x*")
    ranking = parse_ranking(text, candidate_sids)
    if ranking is None:
        return config.unparseable_reward
    pre_rank = list(candidate_sids).index(target_sid) + 1
    reranked = rank_reward(pre_rank, ranking.index(target_sid) + 1, config.num_candidates)
    earns_format = not config.conditional or reranked > 0 or pre_rank == 1
    return reranked + config.format_weight if earns_format else reranked
