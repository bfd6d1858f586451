"""GR2 on MovieLens-100K: rerank a pre-ranker's top 10 with an LLM that reads and writes semantic IDs.

GR2 (Generative Reasoning Reranker, arXiv 2602.07774; docs/gr2.md) has three stages: mid-training
on semantic IDs (SIDs), SFT on reasoning traces of a teacher kept by rejection sampling, and DAPO
(arXiv 2503.14476, algorithms/dapo.py) with a verifiable reward that copying the input order
cannot game. This module is that pipeline as a recrl task (`experiments/run.py` calls its hooks).

Requests and candidates
-----------------------
Next-item requests come from `experiments.data.next_item` (the per-user temporal split of
baselines_ml100k). The pre-ranker is EASE (experiments/baselines.py), fit on the train parts for
train and validation requests and on train + validation for test requests (as in the baselines).
Its top |D| = 10 unseen, recommendable items, without a second id of an already listed or seen
title, are the candidates, in pre-ranker order, so rank_pre(x) is x's 1-based position. Only
requests whose target x* is among them *qualify* (GR2 reranks lists that contain x*); the
builder prints how many do.

Prompt and completion
---------------------
The prompt lists the user's last liked items (`history_length`) and the candidates, each as
``<SID> Title (Year) | genres``. The completion is a short reasoning, then the marker line and
the |D| candidate SIDs, best first, one per line (`rewards.gr2.format_ranking`):

    Liked genres: Drama, Comedy. Top pick <a_4><b_1><c_9>: shares Drama.
    Ranking:
    <a_4><b_1><c_9>
    ...

``Ranking:`` is one added token (the marker), like the SID tokens (`prepare_policy`).

Constrained decoding (`RankingConstraint`, a logits hook of engine/rollout.py)
----------------------------------------------------------------------------
Before the marker the text is free, except that the marker may only start a line (position 0
or after a token ending in a newline). From the first marker on, the grammar is forced: a
newline, then |D| lines of L SID tokens each, separated by newlines, then EOS. At a SID slot
only the next token of a candidate whose SID matches the line's tokens so far and which no
earlier line has written is allowed; so every candidate appears exactly once and the ranked
part always parses. Everything is computed from the completion tokens before each position
with tensor ops, so the learner's recompute (engine/logprobs.py) applies the identical mask and
its log-probs equal the sampler's. `constrained_decoding = False` turns the hook off (sampling and
evaluation), so the ranked part can break: the setting in which copying the input order is the
safe way to a parseable answer (the reward hack; docs/gr2.md). `allow_repeated_candidates = True`
keeps the grammar and the restriction to candidate SIDs but drops "unused": a line may repeat an
earlier candidate, and a ranking with a repeat does not parse (a broken format, as in free text,
while every line still names a real candidate).

Warm start (`warm_start`)
-------------------------
* Stage 1, mid-training: next-SID prediction (history SIDs -> the next liked item's SID) on
  every training request, and SID -> ``Title (Year) | genres`` for every item
  (`task.midtrain_steps` steps, `sft.lr`, `sft.batch_size`).
* Stage 2, SFT (`sft.steps`) on teacher traces for the qualifying training requests. The
  teacher is stochastic and built from the data: a Plackett-Luce draw of the candidates with
  logits (z(score) + w * genre affinity) / temperature, where z(score) is the pre-ranker score
  standardised over the |D| candidates and the affinity is the fraction of shown history items
  that share a genre with the candidate; the reason is a template naming the liked genres and
  the top pick. `trace_variant` "rejection": up to `teacher_attempts` draws without seeing x*;
  the first whose top item is x* is kept, and a request without one gets no trace. "targeted":
  x* is revealed and put first, the rest in the teacher's drawn order, for every request.
Both stages are cached (experiments/warm_start.py), keyed by what each depends on, so variants
that differ only in the reward share them.

Reward (rewards/gr2.py): R_rank = (rank_pre(x*) - rank_re(x*)) / |D|; R_fmt = 1 if the output
parses; conditional R = R_rank + alpha R_fmt if R_rank > 0 or rank_pre(x*) = 1, else R_rank;
unconditional R = R_rank + alpha R_fmt; unparseable: `unparseable_reward` (<= 0; -1 by default, below
every parseable reward; 0 reads the paper literally: no format reward and no rank reward). Every
reward call logs in the task's state how the completions treat the input order: the fractions that
copy it (the hack), keep x* at its pre-rank and promote x*, and the pairwise order agreement.

Evaluation: greedy (constrained unless turned off) on the qualifying validation (chooses the
checkpoint, NDCG@5) or test requests: Recall@1, Recall@5 and NDCG@5 of x* in the reranked list (one
relevant item: Recall@k = 1[rank <= k], NDCG@k = 1 / log2(rank + 1) if rank <= k; an unparseable
output counts as a miss), the same for the pre-rank order, the parse, copy and kept fractions and
the order agreement (0 when nothing parses). `summarize_runs` (``python -m experiments.gr2_task
RUN_DIR ...``) re-evaluates the SFT and chosen RL checkpoints per request for paired bootstrap
intervals and collects the input-order indicators over the RL steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from engine.config import check, check_choice
from engine.logging import read_metrics
from experiments.run_records import read_selection
from experiments.statistics import paired_bootstrap
from experiments.warm_start import cached_stage, sft_progress
from models.semantic_ids import SemanticIdConfig, SemanticIds, add_sid_tokens, add_vocabulary_tokens
from rewards.gr2 import (RANKING_MARKER, GR2RewardConfig, copies_input_order, format_ranking, gr2_reward,
                         order_agreement, parse_ranking)
from rewards.lists import format_item

TRACE_VARIANTS = ("rejection", "targeted")
_SID_TOKEN = re.compile(r"<[a-z]_\d+>")
_CACHE_VERSION = 1
MAX_CANDIDATES = 100  # the paper reranks 10; each candidate costs a prompt line and an answer line


@dataclass
class GR2TaskConfig:
    num_candidates: int = 10  # |D|
    history_length: int = 5  # liked history items shown in a prompt
    train_prefixes_per_user: int | None = 20  # training requests per user before qualification; None = all
    eval_size: int = 0  # first eval_size qualifying val / test requests; 0 = all
    pre_ranker_l2: float = 500.0  # EASE lambda
    sid_levels: int = 3
    sid_codebook_size: int = 64
    sid_facts: int = 6  # knowledge-graph facts per item in the SID text
    sid_dim: int = 64  # item vector size (truncated SVD rank)
    midtrain_steps: int = 200  # stage 1; 0 = none
    trace_variant: str = "rejection"  # rejection | targeted
    teacher_temperature: float = 1.0
    teacher_genre_weight: float = 1.0
    teacher_attempts: int = 8  # rejection sampling: draws per request
    format_weight: float = 0.1  # alpha
    conditional_reward: bool = True
    unparseable_reward: float = -1.0  # <= 0; 0 = the paper's literal reading (R_fmt = 0, no rank reward)
    constrained_decoding: bool = True  # False: the ranked part is free text (sampling and evaluation)
    allow_repeated_candidates: bool = False  # the constraint lets a line repeat a candidate (which breaks the format)

    def reward_shape(self) -> str:
        """The kind of reward this task gives (a key of algorithms.base.REWARD_SHAPES)."""
        return "sequence"  # the rank gain of the held-out item (+ the format bonus)

    def __post_init__(self) -> None:
        check(2 <= self.num_candidates <= MAX_CANDIDATES, "num_candidates", self.num_candidates,
              f"must be in [2, {MAX_CANDIDATES}]: every candidate is written into the prompt and the ranked answer")
        check(self.history_length >= 1, "history_length", self.history_length, "must be >= 1")
        check(self.train_prefixes_per_user is None or self.train_prefixes_per_user >= 1, "train_prefixes_per_user",
              self.train_prefixes_per_user, "must be >= 1 (or none for every usable prefix)")
        check(self.eval_size >= 0, "eval_size", self.eval_size, "must be >= 0 (0 = every qualifying request)")
        check(self.pre_ranker_l2 > 0, "pre_ranker_l2", self.pre_ranker_l2, "must be > 0")
        check(1 <= self.sid_levels <= 8, "sid_levels", self.sid_levels, "must be in 1..8")
        check(self.sid_codebook_size >= 2, "sid_codebook_size", self.sid_codebook_size, "must be >= 2")
        check(self.sid_facts >= 0, "sid_facts", self.sid_facts, "must be >= 0")
        check(self.sid_dim >= 1, "sid_dim", self.sid_dim, "must be >= 1")
        check(self.midtrain_steps >= 0, "midtrain_steps", self.midtrain_steps, "must be >= 0 (0 = no stage 1)")
        check_choice("trace_variant", self.trace_variant, TRACE_VARIANTS)
        check(self.teacher_temperature > 0, "teacher_temperature", self.teacher_temperature, "must be > 0")
        check(self.teacher_attempts >= 1, "teacher_attempts", self.teacher_attempts, "must be >= 1")
        check(self.format_weight >= 0, "format_weight", self.format_weight, "must be >= 0 (alpha)")
        check(self.unparseable_reward <= 0, "unparseable_reward", self.unparseable_reward,
              "must be <= 0 (a broken format must not pay; below -(|D|-1)/|D| it pays less than any ranking)")
        check(self.constrained_decoding or not self.allow_repeated_candidates, "allow_repeated_candidates",
              self.allow_repeated_candidates, "needs constrained_decoding = true (free decoding allows anything)")


@dataclass(frozen=True)
class RerankRequest:
    """One qualifying request: x* is among the candidates (pre-ranker order)."""

    user_id: int
    history_item_ids: tuple[int, ...]  # shown in the prompt, oldest first
    candidate_item_ids: tuple[int, ...]  # the pre-ranker's top |D|, best first
    candidate_scores: tuple[float, ...]  # their pre-ranker scores (the teacher reads them)
    target_item_id: int

    @property
    def pre_rank(self) -> int:
        return self.candidate_item_ids.index(self.target_item_id) + 1


# ---------------------------------------------------------------------------
# constrained decoding
# ---------------------------------------------------------------------------


class RankingConstraint:
    """Logits hook (engine.logprobs.LogitsHook) that forces the ranked part (module docstring).

    candidate_token_ids [P, D, L]: the SID token ids of each prompt's candidates; ends_line [V]
    bool: tokens whose text ends with a newline. With m the position of the first marker token
    and k = t - m - 1 the offset of position t after it, W = L + 1 tokens per line:

        k = 0                          newline
        k >= 1, j = (k-1) // W, s = (k-1) % W:
            s < L, j < D               level-s token of an open candidate (prefix matches, unused;
                                       with allow_repeats, prefix matches)
            s = L, j < D - 1           newline
            otherwise                  EOS
    """

    def __init__(self, candidate_token_ids: Tensor, marker_id: int, newline_id: int, eos_id: int, ends_line: Tensor,
                 allow_repeats: bool = False):
        if candidate_token_ids.dim() != 3:
            raise ValueError(f"candidate_token_ids must be [P, D, L]; got {tuple(candidate_token_ids.shape)}")
        self.candidates = candidate_token_ids.long()  # [P, D, L]
        self.ends_line = ends_line.bool()  # [V]
        self.marker_id, self.newline_id, self.eos_id = marker_id, newline_id, eos_id
        self.allow_repeats = allow_repeats
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}  # the two tables, copied once per device

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            self._tables[device] = self.candidates.to(device), self.ends_line.to(device)
        return self._tables[device]

    @classmethod
    def build(cls, tokenizer, candidate_sids: list[list[str]], num_candidates: int,
              allow_repeats: bool = False) -> "RankingConstraint":
        """The constraint for prompts whose candidates are `candidate_sids` (one list per prompt index)."""
        if not candidate_sids:
            raise ValueError("no prompts: pass one candidate SID list per prompt index")
        vocabulary = tokenizer.get_vocab()
        for token in (RANKING_MARKER,):
            if token not in vocabulary:
                raise ValueError(f"the tokenizer has no {token!r} token; call the task's prepare_policy(model, "
                                 "tokenizer) first (it adds the marker and SID tokens)")
        rows, levels = [], None
        for index, sids in enumerate(candidate_sids):
            check_candidate_list(sids, num_candidates, f"prompt {index}")
            row = []
            for sid in sids:
                tokens = _SID_TOKEN.findall(sid)
                if "".join(tokens) != sid:
                    raise ValueError(f"{sid!r} is not a SID made of <letter_code> tokens (prompt {index})")
                missing = [token for token in tokens if token not in vocabulary]
                if missing:
                    raise ValueError(f"SID {sid!r} (prompt {index}) uses {missing[0]!r}, which the tokenizer lacks; "
                                     "add the SID tokens first (prepare_policy / models.semantic_ids.add_sid_tokens)")
                if levels is None:
                    levels = len(tokens)
                if len(tokens) != levels:
                    raise ValueError(f"SID {sid!r} has {len(tokens)} levels, others {levels}; all SIDs need one depth")
                row.append([vocabulary[token] for token in tokens])
            rows.append(row)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1:
            raise ValueError(f"the tokenizer writes a newline as {len(newline)} tokens; the ranked part needs one")
        vocab_size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab_size)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        ends_line = torch.tensor([text.endswith("\n") for text in texts])  # [V]
        return cls(torch.tensor(rows, dtype=torch.long), vocabulary[RANKING_MARKER], newline[0],
                   tokenizer.eos_token_id, ends_line, allow_repeats)

    def __call__(self, logits: Tensor, prompt_indices: Tensor, completion_ids: Tensor, start: int) -> Tensor:
        num_rows, width, vocab_size = logits.shape  # [N, C, V]
        device = logits.device
        # checked where it costs no device sync (the sampler marks rows without an index with -1)
        if prompt_indices is None or device.type == "cpu" and bool(
                ((prompt_indices < 0) | (prompt_indices >= self.candidates.shape[0])).any()):
            raise ValueError(f"RankingConstraint needs prompt indices in [0, {self.candidates.shape[0]}) for every "
                             "row; pass prompt_indices to sample / greedy_generate / completion_logprobs")
        candidate_table, ends_line = self.tables(device)
        candidates = candidate_table[prompt_indices]  # [N, D, L]
        num_candidates, levels = candidates.shape[1:]
        line_width = levels + 1
        length = completion_ids.shape[1]
        positions = start + torch.arange(width, device=device)  # [C]

        is_marker = completion_ids == self.marker_id  # [N, T]
        never = length + num_candidates * line_width + 2  # a marker position no completion reaches
        first = torch.where(is_marker.any(1), is_marker.int().argmax(1), torch.full_like(is_marker[:, 0], never,
                                                                                       dtype=torch.long))  # [N]
        offset = positions[None, :] - first[:, None] - 1  # [N, C]
        ranked = offset >= 0
        line = torch.div(offset - 1, line_width, rounding_mode="floor")  # [N, C]
        slot = torch.remainder(offset - 1, line_width)  # [N, C]
        sid_slot = ranked & (offset >= 1) & (slot < levels) & (line < num_candidates)
        forced_newline = ranked & ((offset == 0) | ((slot == levels) & (line < num_candidates - 1)))
        forced = ranked & ~sid_slot  # newline or EOS

        # candidates written by lines finished before t: line j's level l sits at m + 2 + j W + l
        level_range = torch.arange(levels, device=device)
        line_starts = first[:, None] + 2 + torch.arange(num_candidates, device=device)[None, :] * line_width  # [N, D]
        line_positions = (line_starts[:, :, None] + level_range).clamp(0, length - 1)  # [N, D, L]
        line_tokens = completion_ids.gather(1, line_positions.flatten(1)).view_as(line_positions)  # [N, D, L]
        line_is = (line_tokens[:, :, None, :] == candidates[:, None, :, :]).all(-1)  # [N, D lines, D candidates]
        finished = (line_starts + levels - 1)[:, None, :] < positions[None, :, None]  # [N, C, D lines]
        used = torch.bmm(finished.float(), line_is.float()) > 0  # [N, C, D candidates]
        if self.allow_repeats:
            used = torch.zeros_like(used)

        # the current line's tokens so far must be a prefix of the candidate's SID
        current_slot = slot.clamp(max=levels - 1)  # [N, C]
        prefix_positions = (positions[None, :, None] - current_slot[..., None] + level_range).clamp(0, length - 1)
        prefix_tokens = completion_ids.gather(1, prefix_positions.flatten(1)).view_as(prefix_positions)  # [N, C, L]
        relevant = level_range < current_slot[..., None]  # [N, C, L]
        prefix_ok = ((prefix_tokens[:, :, None, :] == candidates[:, None, :, :])
                     | ~relevant[:, :, None, :]).all(-1)  # [N, C, D]
        open_candidates = prefix_ok & ~used & sid_slot[..., None]  # [N, C, D]
        next_tokens = candidates[:, None, :, :].expand(-1, width, -1, -1).gather(
            3, current_slot[:, :, None, None].expand(-1, -1, num_candidates, 1)).squeeze(3)  # [N, C, D]

        # allowed tokens of ranked positions: open candidates' next tokens, or the forced token; a state the
        # grammar cannot reach (no open candidate) allows EOS, so the normaliser stays finite
        stuck = sid_slot & ~open_candidates.any(-1)
        forced_token = torch.where(forced_newline, self.newline_id, self.eos_id)  # [N, C]
        extra = torch.where(forced | stuck, forced_token, vocab_size)  # [N, C]; vocab_size = a dropped column
        index = torch.cat([torch.where(open_candidates, next_tokens, vocab_size), extra[..., None]], dim=2)
        ranked_allowed = torch.zeros(num_rows, width, vocab_size + 1, dtype=torch.bool, device=device)
        ranked_allowed = ranked_allowed.scatter_(2, index, True)[..., :vocab_size]  # [N, C, V]

        # free text: the marker only at the start of a line
        previous = completion_ids.gather(1, (positions - 1).clamp(min=0)[None, :].expand(num_rows, -1))  # [N, C]
        marker_ok = (positions[None, :] == 0) | ends_line[previous]  # [N, C]
        is_marker_column = torch.arange(vocab_size, device=device) == self.marker_id  # [V]
        free_allowed = ~(is_marker_column[None, None, :] & ~marker_ok[..., None])  # [N, C, V]
        allowed = torch.where(ranked[..., None], ranked_allowed, free_allowed)
        return logits.masked_fill(~allowed, float("-inf"))


def check_candidate_list(candidate_sids: list[str], num_candidates: int, where: str = "request") -> None:
    """A clear error for a candidate list GR2 cannot rerank: wrong length or a repeated candidate."""
    if len(candidate_sids) != num_candidates:
        raise ValueError(f"{where} has {len(candidate_sids)} candidates; GR2 reranks exactly |D| = {num_candidates} "
                         "(drop the request or set task.num_candidates)")
    repeated = [sid for sid, count in Counter(candidate_sids).items() if count > 1]
    if repeated:
        raise ValueError(f"{where} lists candidate {repeated[0]!r} more than once; each candidate must be a "
                         "distinct item (deduplicate the pre-ranker's list)")


# ---------------------------------------------------------------------------
# metrics and paired bootstrap
# ---------------------------------------------------------------------------


def rank_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-request Recall@1, Recall@5, NDCG@5 of one relevant item at 1-based `ranks` [R] (0 = not ranked)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks >= 1
    return {"recall@1": (hit & (ranks <= 1)).astype(float), "recall@5": (hit & (ranks <= 5)).astype(float),
            "ndcg@5": np.where(hit & (ranks <= 5), 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)}


# ---------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------


class GR2Task:
    selection_metric = "ndcg@5"

    def __init__(self, config: GR2TaskConfig, semantic_ids: SemanticIds, movies: dict, splits: dict[str, list],
                 midtrain_requests: list[tuple[tuple[int, ...], int]], seed: int = 0, fingerprint: str = "",
                 request_counts: dict[str, int] | None = None):
        for split in ("train", "val", "test"):
            if not splits.get(split):
                raise ValueError(f"no qualifying {split} request: the pre-ranker's top {config.num_candidates} never "
                                 f"holds the target (check the data, or change task.num_candidates)")
            for index, request in enumerate(splits[split]):
                check_candidate_list(list(request.candidate_item_ids), config.num_candidates,
                                     f"{split} request {index}")
                if request.target_item_id not in request.candidate_item_ids:
                    raise ValueError(f"{split} request {index}: the target is not among the candidates")
        self.config, self.semantic_ids, self.movies, self.seed = config, semantic_ids, movies, seed
        self.train, self.splits = splits["train"], {"val": splits["val"], "test": splits["test"]}
        self.midtrain_requests, self.fingerprint = midtrain_requests, fingerprint
        self.request_counts = dict(request_counts or {})  # split -> requests before qualification
        self.reward_config = GR2RewardConfig(config.num_candidates, config.format_weight, config.conditional_reward,
                                             config.unparseable_reward)
        self.logits_hook: RankingConstraint | None = None  # set by bind()
        self.hooks: dict[str, RankingConstraint] = {}
        self.reward_log: list[dict] = []

    def qualifying_report(self) -> dict[str, dict[str, int | None]]:
        """Per split: the qualifying requests kept (after `eval_size`) and the requests before qualification."""
        kept = {"train": len(self.train), **{split: len(items) for split, items in self.splits.items()}}
        return {split: {"qualifying": count, "requests": self.request_counts.get(split)}
                for split, count in kept.items()}

    # --- text -------------------------------------------------------------
    def genres(self, item_id: int) -> list[str]:
        return [genre for genre in self.movies[item_id].genres if genre.casefold() != "unknown"]

    def item_line(self, item_id: int) -> str:
        """``<SID> Title (Year) | genres``."""
        return f"{self.semantic_ids.sid_of(item_id)} {self.item_text(item_id)}"

    def item_text(self, item_id: int) -> str:
        return f"{format_item(self.movies[item_id].item)} | {', '.join(self.genres(item_id)) or 'no genre'}"

    def candidate_sids(self, request: RerankRequest) -> list[str]:
        return [self.semantic_ids.sid_of(item_id) for item_id in request.candidate_item_ids]

    def messages(self, request: RerankRequest) -> list[dict]:
        history = "\n".join(self.item_line(item_id) for item_id in request.history_item_ids)
        candidates = "\n".join(self.item_line(item_id) for item_id in request.candidate_item_ids)
        return [{"role": "user", "content": (
            f"Movies the user liked, oldest first:\n{history}\n\nCandidates, best first:\n{candidates}\n\n"
            f"Rerank the {len(request.candidate_item_ids)} candidates: a short reason, then the ranking.")}]

    def reason(self, request: RerankRequest, top_item_id: int) -> str:
        """The teacher's templated reasoning for putting `top_item_id` first."""
        liked = Counter(genre for item_id in request.history_item_ids for genre in self.genres(item_id))
        favourite = [genre for genre, _ in sorted(liked.items(), key=lambda pair: (-pair[1], pair[0]))[:2]]
        shared = sorted((genre for genre in self.genres(top_item_id) if genre in liked),
                        key=lambda genre: (-liked[genre], genre))[:2]
        why = f"shares {', '.join(shared)}" if shared else "liked by similar viewers"
        return (f"Liked genres: {', '.join(favourite) or 'none'}. "
                f"Top pick {self.semantic_ids.sid_of(top_item_id)}: {why}.")

    # --- teacher traces ----------------------------------------------------
    def teacher_logits(self, request: RerankRequest) -> np.ndarray:
        """(z(score) + w * genre affinity) / temperature over the candidates [D] (module docstring)."""
        scores = np.asarray(request.candidate_scores, dtype=np.float64)  # [D]
        standardised = (scores - scores.mean()) / (scores.std() + 1e-9)
        history = [set(self.genres(item_id)) for item_id in request.history_item_ids]
        affinity = np.array([np.mean([bool(set(self.genres(c)) & h) for h in history]) if history else 0.0
                             for c in request.candidate_item_ids])  # [D]
        return (standardised + self.config.teacher_genre_weight * affinity) / self.config.teacher_temperature

    def teacher_trace(self, index: int) -> str | None:
        """The trace for training request `index` under `trace_variant`, or None (rejection found none)."""
        request = self.train[index]
        rng = np.random.default_rng([self.seed, index])
        logits, candidates = self.teacher_logits(request), np.array(request.candidate_item_ids)
        target = candidates == request.target_item_id  # [D]
        if self.config.trace_variant == "targeted":
            rest = candidates[~target][np.argsort(-(logits[~target] + rng.gumbel(size=int((~target).sum()))),
                                                  kind="stable")]
            ranking = [request.target_item_id, *rest.tolist()]
        else:
            for _ in range(self.config.teacher_attempts):  # Plackett-Luce draws by Gumbel-max
                ranking = candidates[np.argsort(-(logits + rng.gumbel(size=logits.size)), kind="stable")].tolist()
                if ranking[0] == request.target_item_id:
                    break
            else:
                return None
        sids = [self.semantic_ids.sid_of(item_id) for item_id in ranking]
        return format_ranking(self.reason(request, ranking[0]), sids)

    def midtrain_examples(self) -> tuple[list[list[dict]], list[str]]:
        """Stage 1: history SIDs -> next SID for every training request, SID -> title for every item."""
        chats, targets = [], []
        for history_item_ids, target_item_id in self.midtrain_requests:
            history = " ".join(self.semantic_ids.sid_of(item_id) for item_id in history_item_ids)
            chats.append([{"role": "user", "content": f"Next item after: {history}"}])
            targets.append(self.semantic_ids.sid_of(target_item_id))
        for item_id in self.semantic_ids.item_ids:
            chats.append([{"role": "user", "content": f"Item {self.semantic_ids.sid_of(item_id)}"}])
            targets.append(self.item_text(item_id))
        return chats, targets

    def corpus(self) -> list[str]:
        """Text for the tokenizer (no SIDs: they are added tokens): item texts, prompt and reason phrases."""
        genres = sorted({genre for item_id in self.semantic_ids.item_ids for genre in self.genres(item_id)})
        phrases = ["Movies the user liked, oldest first:", "Candidates, best first:", "Next item after:", "Item",
                   f"Rerank the {self.config.num_candidates} candidates: a short reason, then the ranking.",
                   "Liked genres: none. Top pick : liked by similar viewers.",
                   *(f"Liked genres: {a}, {b}. Top pick : shares {a}, {b}." for a in genres for b in genres)]
        return [self.item_text(item_id) for item_id in self.semantic_ids.item_ids] + phrases

    # --- pipeline hooks (experiments/run.py) -------------------------------
    def prepare_policy(self, model, tokenizer) -> None:
        """Add the SID tokens and the marker token (idempotent)."""
        add_sid_tokens(tokenizer, model, self.semantic_ids, seed=self.seed)
        add_vocabulary_tokens(tokenizer, model, [RANKING_MARKER], seed=self.seed)

    def bind(self, model, tokenizer) -> None:
        """Build the constrained-decoding hooks of the three splits (they need the token ids); none when
        `constrained_decoding` is off."""
        requests = {"train": self.train, **self.splits}
        self.hooks = {split: RankingConstraint.build(tokenizer, [self.candidate_sids(r) for r in items],
                                                     self.config.num_candidates,
                                                     self.config.allow_repeated_candidates)
                      for split, items in requests.items()} if self.config.constrained_decoding else {}
        self.logits_hook = self.hooks.get("train")

    def warm_start(self, model, tokenizer, config) -> list[dict]:
        """Stage 1 (mid-training) then stage 2 (SFT on teacher traces), each cached (module docstring)."""
        from engine.sft import SFTConfig, supervised_finetune

        lengths = dict(max_prompt_length=config.trainer.max_prompt_length,
                       max_completion_length=config.sampling.max_new_tokens)
        common = {"version": _CACHE_VERSION, "model": asdict(config.model), "seed": config.seed, "data":
                  self.fingerprint, "sft": asdict(config.sft), **lengths,
                  "tokenizer": sorted(tokenizer.get_vocab().items()),  # trained on a corpus the task settings shape
                  "task": {key: value for key, value in asdict(self.config).items()
                           if key in ("history_length", "train_prefixes_per_user", "sid_levels", "sid_codebook_size",
                                      "sid_facts", "sid_dim", "midtrain_steps")}}
        history: list[dict] = []
        if self.config.midtrain_steps:
            chats, targets = self.midtrain_examples()
            stage = SFTConfig(**{**asdict(config.sft), "steps": self.config.midtrain_steps})
            print(f"GR2 stage 1: mid-training, {stage.steps} steps on {len(chats)} next-SID / SID->title examples")
            history += cached_stage(model, "gr2-stage1", common, lambda: supervised_finetune(
                model, tokenizer, chats, targets, stage, seed=config.seed, on_step=sft_progress(stage.steps, "stage 1"),
                **lengths))
        kept = [(i, trace) for i in range(len(self.train)) if (trace := self.teacher_trace(i)) is not None]
        if not kept:
            raise ValueError("the teacher kept no trace; raise task.teacher_attempts or use trace_variant=targeted")
        print(f"GR2 stage 2: SFT, {config.sft.steps} steps on {len(kept)} {self.config.trace_variant} traces "
              f"({len(self.train)} qualifying training requests)")
        teacher = {key: value for key, value in asdict(self.config).items()
                   if key.startswith("teacher_") or key in ("trace_variant", "num_candidates", "pre_ranker_l2")}
        history += cached_stage(model, "gr2-stage2", {**common, "teacher": teacher}, lambda: supervised_finetune(
            model, tokenizer, [self.messages(self.train[i]) for i, _ in kept], [trace for _, trace in kept],
            config.sft, seed=config.seed, on_step=sft_progress(config.sft.steps, "stage 2"), **lengths))
        return history + [{"traces": len(kept), "qualifying_train_requests": len(self.train)}]

    # --- RL ---------------------------------------------------------------
    def num_train_prompts(self) -> int:
        return len(self.train)

    def train_messages(self, index: int) -> list[dict]:
        return self.messages(self.train[index])

    def rewards(self, prompt_indices: list[int], completions: list[str], rollout=None) -> Tensor:
        """GR2 reward of each completion [B]; logs how the completions treat the input order: the fractions
        that copy it, keep x* at its pre-rank, promote x*, parse, and the mean pairwise order agreement."""
        values, copied, parsed, kept, promoted, agreement = [], [], [], [], [], []
        for index, text in zip(prompt_indices, completions):
            request = self.train[index]
            sids = self.candidate_sids(request)
            target = self.semantic_ids.sid_of(request.target_item_id)
            values.append(gr2_reward(text, sids, target, self.reward_config))
            ranking = parse_ranking(text, sids)
            parsed.append(ranking is not None)
            copied.append(copies_input_order(ranking, sids))
            new_rank = None if ranking is None else ranking.index(target) + 1
            kept.append(new_rank == request.pre_rank)
            promoted.append(new_rank is not None and new_rank < request.pre_rank)
            if ranking is not None:
                agreement.append(order_agreement(ranking, sids))
        groups = len(set(prompt_indices)) if rollout is None else int(rollout.group_ids.unique().numel())
        consumed = (self.reward_log[-1]["prompts"] if self.reward_log else 0) + groups
        self.reward_log.append({"prompts": consumed, "rows": len(values), "reward": float(np.mean(values)),
                                "copy_frac": float(np.mean(copied)), "parse_frac": float(np.mean(parsed)),
                                "kept_frac": float(np.mean(kept)), "promote_frac": float(np.mean(promoted)),
                                "order_agreement": float(np.mean(agreement)) if agreement else None})
        return torch.tensor(values, dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"reward_log": list(self.reward_log)}

    def load_state_dict(self, state: dict) -> None:
        self.reward_log = list(state.get("reward_log", []))

    # --- evaluation -------------------------------------------------------
    def reranked_ranks(self, generate: Callable[..., list[str]], split: str) -> dict[str, np.ndarray]:
        """Per request of `split`: rank of x* after reranking (0 = unparseable) and before, whether the output
        copies the input order, and its pairwise order agreement with it (NaN when unparseable)."""
        requests = self.splits[split]
        texts = generate([self.messages(r) for r in requests], prompt_indices=list(range(len(requests))),
                         logits_hook=self.hooks.get(split))
        reranked, copied, agreement = [], [], []
        for request, text in zip(requests, texts):
            sids = self.candidate_sids(request)
            ranking = parse_ranking(text, sids)
            target = self.semantic_ids.sid_of(request.target_item_id)
            reranked.append(0 if ranking is None else ranking.index(target) + 1)
            copied.append(copies_input_order(ranking, sids))
            agreement.append(np.nan if ranking is None else order_agreement(ranking, sids))
        return {"reranked": np.array(reranked), "pre": np.array([r.pre_rank for r in requests]),
                "copied": np.array(copied, dtype=bool), "agreement": np.array(agreement)}

    def evaluate(self, generate: Callable[..., list[str]], split: str = "test") -> dict[str, float]:
        outcome = self.reranked_ranks(generate, split)
        result = {name: float(values.mean()) for name, values in rank_metrics(outcome["reranked"]).items()}
        result.update({f"pre_rank/{name}": float(values.mean())
                       for name, values in rank_metrics(outcome["pre"]).items()})
        result["parse_frac"] = float((outcome["reranked"] > 0).mean())
        result["copy_frac"] = float(outcome["copied"].mean())
        result["kept_frac"] = float((outcome["reranked"] == outcome["pre"]).mean())
        parsed = outcome["agreement"][~np.isnan(outcome["agreement"])]
        result["order_agreement"] = float(parsed.mean()) if parsed.size else 0.0
        return result


# ---------------------------------------------------------------------------
# building the task
# ---------------------------------------------------------------------------


def _top_candidates(scores: np.ndarray, seen: tuple[int, ...], conversations, count: int) -> list[int]:
    """The pre-ranker's best `count` recommendable, unseen item ids; a second id of a listed or seen title
    (ML-100K has 18 such pairs) is skipped."""
    from experiments.baselines import top_k_item_ids

    recommendable = conversations.recommendable_items
    titles = {recommendable[item_id] for item_id in seen if item_id in recommendable}
    chosen: list[int] = []
    for item_id in top_k_item_ids(scores, count + len(titles) + 20, set(seen) | conversations.unrecommendable_item_ids):
        if recommendable[item_id] not in titles:
            titles.add(recommendable[item_id])
            chosen.append(item_id)
            if len(chosen) == count:
                break
    return chosen


def qualifying_requests(requests: list, pre_ranker, conversations, config: GR2TaskConfig) -> list[RerankRequest]:
    """Requests whose target is among the pre-ranker's top |D| (module docstring)."""
    from experiments.baselines import scored_examples

    kept = []
    for request, scores in scored_examples(pre_ranker, requests):
        candidates = _top_candidates(scores, request.seen_item_ids, conversations, config.num_candidates)
        if request.target_item_id in candidates and len(candidates) == config.num_candidates:
            history = request.liked_history_item_ids or request.history_item_ids
            kept.append(RerankRequest(request.user_id, tuple(history[-config.history_length:]), tuple(candidates),
                                      tuple(float(scores[c]) for c in candidates), request.target_item_id))
    return kept


def item_semantic_ids(ratings, config: GR2TaskConfig, seed: int) -> SemanticIds:
    """SIDs of every ML-100K item from ``Title (Year); genres; people`` (experiments/data/item_graph.py)."""
    from experiments.data.item_graph import load_item_graph
    from models.semantic_ids import build_semantic_ids, text_vectors

    graph = load_item_graph(ratings)
    item_ids = sorted(graph.movies)
    vectors = text_vectors([graph.describe(item_id, max_facts=config.sid_facts) for item_id in item_ids],
                           config.sid_dim, seed)
    return build_semantic_ids(vectors, item_ids, SemanticIdConfig(config.sid_levels, config.sid_codebook_size,
                                                                  seed=seed))


def build_task_from_settings(config: GR2TaskConfig, seed: int, data_dir: str | None) -> GR2Task:
    """The task from its settings: data, pre-ranker, qualifying requests and SIDs."""
    from experiments.baselines import EASERecommender
    from experiments.data.movielens import load_movielens
    from experiments.data.next_item import next_item_requests

    conversations = load_movielens(data_dir, progress=False)
    fit = {part: EASERecommender(config.pre_ranker_l2).fit(conversations.interaction_matrix(part))
           for part in ("train", "train+val")}
    train_requests = next_item_requests(conversations, "train", prefixes_per_user=config.train_prefixes_per_user)
    splits = {"train": qualifying_requests(train_requests, fit["train"], conversations, config),
              "val": qualifying_requests(next_item_requests(conversations, "val"), fit["train"], conversations, config),
              "test": qualifying_requests(next_item_requests(conversations, "test"), fit["train+val"], conversations,
                                          config)}
    totals = {"train": len(train_requests), **{s: len(next_item_requests(conversations, s)) for s in ("val", "test")}}
    if config.eval_size:
        splits["val"], splits["test"] = splits["val"][: config.eval_size], splits["test"][: config.eval_size]
    semantic_ids = item_semantic_ids(conversations.ratings, config, seed)
    report = semantic_ids.report
    print("data: MovieLens-100K next-item requests; qualifying (x* in EASE's top "
          f"{config.num_candidates}): " + ", ".join(f"{s} {len(splits[s])}/{totals[s]}" for s in splits)
          + f"; SIDs {report['levels']}x{report['codebook_size']}, distinct {report['distinct_before']:.1%} before / "
          f"{report['distinct_final']:.1%} after resolution, codebook usage per level "
          + " / ".join(f"{usage:.2f}" for usage in report["codebook_usage"]))
    midtrain = [(tuple((r.liked_history_item_ids or r.history_item_ids)[-config.history_length:]), r.target_item_id)
                for r in train_requests]
    return GR2Task(config, semantic_ids, conversations.movies, splits, midtrain, seed,
                   conversations.ratings.fingerprint, totals)


def build_gr2_task(config, data_dir: str | None) -> tuple[GR2Task, list[str], str, str]:
    """(task, tokenizer corpus, data source, data fingerprint) for an experiment's config."""
    task = build_task_from_settings(config.task, config.seed, data_dir)
    return task, task.corpus(), "movielens-100k", task.fingerprint


# ---------------------------------------------------------------------------
# the results table and the reward-hack trajectory
# ---------------------------------------------------------------------------

_DATA_KEYS = ("num_candidates", "history_length", "eval_size", "pre_ranker_l2", "sid_levels", "sid_codebook_size",
              "sid_facts", "sid_dim")


def _test_outcome(task: GR2Task, folder: Path, tree: dict) -> dict[str, np.ndarray]:
    """Per-request outcome on the test requests of the model in `folder` (greedy, constrained)."""
    from engine.trainer import completion_stop_ids, greedy_generate
    from fastdecode import fast_decoder
    from models.loader import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(folder))
    task.prepare_policy(model, tokenizer)
    task.bind(model, tokenizer)
    stop_ids = completion_stop_ids(task, tokenizer, model)

    def generate(chats, prompt_indices=None, logits_hook=None):
        return greedy_generate(model, tokenizer, chats, tree["sampling"]["max_new_tokens"],
                               tree["trainer"]["max_prompt_length"], tree["trainer"]["eval_batch_size"], stop_ids,
                               fast_decoder, prompt_indices, logits_hook)

    return task.reranked_ranks(generate, "test")


def run_selection(run_dir: Path, metric: str = GR2Task.selection_metric) -> dict:
    """How the trainer chose the reported checkpoint: selection.json, or eval.json's "selection" entry. For a
    run stopped before its end (neither holds one), the validation rows of metrics.jsonl: `checkpoints/best`
    is then the first best of those evaluations (the trainer replaces it only on a strict improvement)."""
    selection = read_selection(run_dir)
    if selection.get("best_step") is None:
        rows = read_metrics(run_dir / "metrics.jsonl")
        history = [[row["step"], row[f"eval/{metric}"]] for row in rows
                   if row.get("eval") and row.get("split") == "val" and f"eval/{metric}" in row]
        if history:
            best_step, best_value = max(history, key=lambda pair: (pair[1], -pair[0]))
            selection = {"metric": metric, "best_step": best_step, "best_value": best_value, "history": history,
                         "stopped_early": True}
    return {key: selection.get(key) for key in ("metric", "best_step", "best_value", "history", "stopped_early")
            if key != "stopped_early" or key in selection}


def run_wall_time(run_dir: Path) -> float | None:
    """Seconds from the run directory's lock file (written when the run starts) to the last write of eval.json
    or metrics.jsonl; None when they are missing. Warm-start stages count when the run computed them."""
    start, ends = run_dir / ".lock", [run_dir / "eval.json", run_dir / "metrics.jsonl"]
    if not start.exists() or not any(end.exists() for end in ends):
        return None
    return round(max(end.stat().st_mtime for end in ends if end.exists()) - start.stat().st_mtime, 1)


ORDER_INDICATORS = ("copy_frac", "kept_frac", "order_agreement")


def order_trajectory(run_dir: Path) -> dict[str, list]:
    """How RL completions treat the input order, per step: `ORDER_INDICATORS` of the sampled training
    completions (the task's reward log in the newest checkpoint, each reward call assigned to its step by the
    prompts consumed; rows-weighted) and of the greedy validation completions (metrics.jsonl eval rows)."""
    from engine.checkpoint import latest_checkpoint

    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [(row["step"], row["prompts_consumed"]) for row in rows
             if not row.get("eval") and "prompts_consumed" in row]
    checkpoint = latest_checkpoint(run_dir, warn=lambda text: None)
    log = torch.load(checkpoint / "components.pt", weights_only=False)["task"]["reward_log"] if checkpoint else []
    sums: dict[int, dict[str, list[float]]] = {}
    for entry in log:
        step = next((step for step, consumed in steps if consumed >= entry["prompts"]), None)
        for name in ORDER_INDICATORS:
            if step is not None and entry.get(name) is not None:
                total = sums.setdefault(step, {}).setdefault(name, [0.0, 0.0])
                total[0] += entry[name] * entry["rows"]
                total[1] += entry["rows"]
    sampled = [{"step": step, **{name: value / weight for name, (value, weight) in totals.items()}}
               for step, totals in sorted(sums.items())]
    greedy = [{"step": row["step"], **{name: row[f"eval/{name}"] for name in ORDER_INDICATORS
                                       if f"eval/{name}" in row}}
              for row in rows if row.get("eval") and row.get("split") == "val"]
    return {"sampled_train": sampled, "greedy_val": greedy}


def _sft_label(tree: dict) -> str:
    task = tree["task"]
    decoding = ((", repeats allowed" if task.get("allow_repeated_candidates") else "")
                if task.get("constrained_decoding", True) else ", free decoding")
    return f"SFT ({task['trace_variant']}{decoding})"


def summarize_runs(run_dirs: list[str | Path], data_dir: str | None = None, bootstrap_samples: int = 10_000) -> dict:
    """The results of GR2 runs: per-request test outcomes of each run's SFT model and chosen RL checkpoint,
    paired bootstrap intervals against the pre-rank and RL against its SFT, and the copy fraction over steps."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    records = [json.loads((run_dir / "config.json").read_text()) for run_dir in run_dirs]
    trees = [record["config"] for record in records]
    if any(tree["task_type"] != "gr2" for tree in trees):
        raise ValueError("summarize_runs takes run directories of GR2 experiments (task type gr2)")
    data = [{key: tree["task"][key] for key in _DATA_KEYS} | {"seed": tree["seed"]} for tree in trees]
    if any(settings != data[0] for settings in data):
        raise ValueError("the runs differ in their data or SID settings; their test requests are not the same")
    task = build_task_from_settings(GR2TaskConfig(**trees[0]["task"]), trees[0]["seed"], data_dir)
    outcomes: dict[str, dict] = {}
    pre = None
    for run_dir, record, tree in zip(run_dirs, records, trees):
        sft_folder, best = Path(record["initial_model"]), run_dir / "checkpoints" / "best"
        for folder in (sft_folder, best):
            if not (folder / "config.json").exists():
                raise ValueError(f"{folder} holds no model; summarize the runs on the machine (and cache) they ran on")
        run_task = copy.copy(task)  # same requests and SIDs; this run's decoding (constrained or free)
        run_task.config = GR2TaskConfig(**tree["task"])
        outcomes.setdefault(_sft_label(tree), _test_outcome(run_task, sft_folder, tree))
        outcomes[f"RL {tree['name']}"] = _test_outcome(run_task, best, tree)
        pre = outcomes[_sft_label(tree)]["pre"]
    table: dict[str, dict] = {}
    pre_metrics = rank_metrics(pre)
    table["pre-rank (EASE)"] = {name: float(values.mean()) for name, values in pre_metrics.items()}
    for label, outcome in outcomes.items():
        metrics = rank_metrics(outcome["reranked"])
        row = {name: float(values.mean()) for name, values in metrics.items()}
        row["parse_frac"], row["copy_frac"] = float((outcome["reranked"] > 0).mean()), float(outcome["copied"].mean())
        row["minus_pre_rank"] = {name: list(paired_bootstrap(values, pre_metrics[name], bootstrap_samples))
                                 for name, values in metrics.items()}
        table[label] = row
    for run_dir, tree in zip(run_dirs, trees):
        row, sft = table[f"RL {tree['name']}"], rank_metrics(outcomes[_sft_label(tree)]["reranked"])
        rl = rank_metrics(outcomes[f"RL {tree['name']}"]["reranked"])
        row["minus_sft"] = {name: list(paired_bootstrap(rl[name], sft[name], bootstrap_samples)) for name in rl}
        row["selection"] = run_selection(run_dir)
    return {"test_requests": int(pre.size), "seeds": sorted({tree["seed"] for tree in trees}),
            "qualifying_requests": task.qualifying_report(), "semantic_ids": task.semantic_ids.report,
            "bootstrap": {"samples": bootstrap_samples, "level": 0.95, "paired_by": "test request"},
            "table": table,
            "input_order": {tree["name"]: order_trajectory(run_dir) for run_dir, tree in zip(run_dirs, trees)},
            "runs": {tree["name"]: {"run_dir": str(run_dir), "seed": tree["seed"], "command": record.get("command"),
                                    "midtrain_steps": tree["task"]["midtrain_steps"], "sft_steps": tree["sft"]["steps"],
                                    "rl_steps": tree["trainer"]["max_steps"], "wall_time_s": run_wall_time(run_dir),
                                    **{key: tree["task"].get(key, getattr(GR2TaskConfig, key)) for key in (
                                        "trace_variant", "conditional_reward", "constrained_decoding",
                                        "allow_repeated_candidates", "unparseable_reward")}}
                     for run_dir, record, tree in zip(run_dirs, records, trees)}}


def format_summary(summary: dict, window: int = 10) -> str:
    """Markdown: the metrics table, then per `window` RL steps the copy fraction / pairwise order agreement
    of the sampled training completions of each run."""
    lines = ["| model | R@1 | R@5 | N@5 | N@5 - pre-rank (95% CI) | N@5 - its SFT (95% CI) | copy | parsed |",
             "|---|---|---|---|---|---|---|---|"]
    interval = lambda values: f"{values[0]:+.3f} [{values[1]:+.3f}, {values[2]:+.3f}]"  # noqa: E731
    for label, row in summary["table"].items():
        lines.append(f"| {label} | {row['recall@1']:.3f} | {row['recall@5']:.3f} | {row['ndcg@5']:.3f} | "
                     + (interval(row["minus_pre_rank"]["ndcg@5"]) if "minus_pre_rank" in row else "") + " | "
                     + (interval(row["minus_sft"]["ndcg@5"]) if "minus_sft" in row else "") + " | "
                     + (f"{row['copy_frac']:.2f} | {row['parse_frac']:.2f} |" if "copy_frac" in row else " | |"))
    runs = summary["input_order"]
    lines += ["", "| RL steps | " + " | ".join(f"{name}: copy / agreement" for name in runs) + " |",
              "|---|" + "---|" * len(runs)]
    series = {name: {row["step"]: row for row in trajectory["sampled_train"]} for name, trajectory in runs.items()}
    last = max((max(steps, default=0) for steps in series.values()), default=0)
    for start in range(1, last + 1, window):
        cells = []
        for steps in series.values():
            rows = [steps[step] for step in range(start, start + window) if step in steps]
            copy = [row["copy_frac"] for row in rows if "copy_frac" in row]
            agreement = [row["order_agreement"] for row in rows if "order_agreement" in row]
            cells.append(" / ".join(f"{np.mean(values):.3f}" if values else "-" for values in (copy, agreement)))
        lines.append(f"| {start}-{min(start + window - 1, last)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.gr2_task",
                                     description="Table and reward-hack trajectory of GR2 runs (summarize_runs)")
    parser.add_argument("run_dirs", nargs="+", help="run directories of gr2_* experiments")
    parser.add_argument("--data-dir", help="data folder (else $RECRL_DATA_DIR)")
    parser.add_argument("--json", help="write the summary here (e.g. experiments/results/gr2_ml100k.json)")
    arguments = parser.parse_args(argv)
    try:
        summary = summarize_runs(arguments.run_dirs, arguments.data_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.json:
        command = ["python", "-m", "experiments.gr2_task", *(sys.argv[1:] if argv is None else argv)]
        Path(arguments.json).write_text(json.dumps({"command": command, **summary}, indent=1) + "\n")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
