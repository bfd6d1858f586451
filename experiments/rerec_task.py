"""ReRec on MovieLens-100K: pick the movie a user will like next among 20 candidates, reasoning first.

ReRec (Huang et al., arXiv 2604.07851, ACL 2026; docs/rerec.md) trains an LLM recommendation
assistant on multiple-choice requests (1 right item, 19 wrong ones) that it answers after a few
reasoning steps with ``\\boxed{item}``. This module builds that task from MovieLens-100K.

Requests. The per-user temporal split of ``baselines_ml100k`` (experiments/data/next_item.py): a
request at cutoff c shows the user's most recent liked movies before c (``history_length`` of
them, "Title (Year): genres"), and its target is the first liked, unseen item after c inside
the request's part (train / val / test; a test request uses the user's first liked test item).
The 20 candidates are the target and 19 negatives drawn uniformly, with a seed fixed per
(split, user, cutoff), from the catalog items the user has not rated up to the end of the
request's part (train part, train + val, whole timeline), distinct as ``Title (Year)``; the
target's position among them is drawn from the same seed.

Rewards (rewards/rerec.py), for answer p = the first ``\\boxed{...}`` and target gt:

    paper form (default)  r = NDCG@1 + w1 S_QAS + w2 S_PAS                (w1 = w2 = 0.01)
    code form             r = 0.1 format + 1.0 NDCG@1 + 0.01 S_QAS + 0.01 S_PAS   (format +-0.5)

    S_QAS = |R_p ∩ R_gt| / |R_gt|, R_x = x's attributes in the item-attribute graph
            (ML-100K genres + knowledge-graph people, companies, subjects: experiments/data/item_graph.py)
    S_PAS = cos(M(p), M(gt)),  M = rows of V_k Σ_k of the rank-k SVD X ≈ U_k Σ_k V_k^T of the binary
            user x item matrix X of the *training* interactions (k = embedding_dim): the cosine of the two
            items' columns of the rank-k approximation of X

An answer naming no candidate scores NDCG@1 = S_QAS = S_PAS = 0 and is counted; no box scores 0
(paper) or -0.55 (code). The paper form is the default: it is the method the paper describes and
every term is defined there, while the code form's format term only adds a constant once the
warm start writes boxes (well-formed fraction ~1) and its second graph score comes from a
service whose source is not public (here S_PAS fills that slot).

Units. With ``reward_unit = "line"`` the task returns one unit per raw "\\n" line of the completion
(``engine.learner.Rewards``): values [B, U] = r on every unit, mask [B, U] = the line exists and is not
blank, extras ``penalised`` [B, U] (RAAE's flags: the answer is wrong and the line names it;
``rewards.rerec.penalised_lines``) and ``ndcg_at_1`` [B] (the curriculum's difficulty). With
``"sequence"`` it returns r as [B, 1] (GRPO).

Warm start. A tiny model cannot reason from nothing, so stage 1 imitates rationales built from
the data, a stand-in for ReRec's LLM-written reasoning: the user's top genres, the target's
genres, what it shares with the closest movie of the shown history (people first, then genres),
then the boxed target. Demonstrations are built only from training requests (history and target
inside the train part); the RL prompts are the latest training request of ``rl_prompts`` users
drawn with the seed, and SFT never sees them or another request of the same user with the same
target. Validation Hit@1 chooses the reported checkpoint.

``python -m experiments.rerec_task NAME=RUN_OR_MODEL ... --out FILE`` evaluates checkpoints on the
test requests and writes the table: metrics, the baselines on the same candidates (random,
popularity, EASE's top-scored candidate) and paired bootstrap intervals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from engine.config import check, check_choice
from engine.learner import Rewards
from experiments.data.item_graph import DESCRIBED_KINDS, GENRE_KIND, ItemGraph
from experiments.run_records import named_rows, read_selection, table_parser
from experiments.statistics import interval_dict
from experiments.warm_start import cached_stage, sft_progress
from rewards.lists import format_item
from rewards.rerec import (
    code_reward,
    first_boxed,
    match_candidate,
    ndcg_at_1,
    paper_reward,
    penalised_lines,
    preference_alignment,
    query_alignment,
)

REWARD_FORMS = ("paper", "code")
REWARD_UNITS = ("line", "sequence")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
EASE_L2_GRID = (50.0, 200.0, 500.0, 1000.0)
SHARED_ATTRIBUTES_SHOWN = 3
TOP_GENRES_SHOWN = 3
#: Task settings that change prompts or demonstrations (and so the warm start); the others
#: only change rewards or evaluation, so every variant shares one SFT checkpoint (``warm_start``).
DEMONSTRATION_FIELDS = ("num_candidates", "history_length", "train_prefixes_per_user", "rl_prompts",
                        "candidate_seed")


@dataclass
class ReRecTaskConfig:
    reward_form: str = "paper"  # paper: NDCG@1 + w1 S_QAS + w2 S_PAS | code: the official rec.py
    query_weight: float = 0.01  # w1 (paper form; the code form's weights are fixed at 0.01)
    preference_weight: float = 0.01  # w2 (paper form)
    reward_unit: str = "line"  # line: one unit per completion line (rerec) | sequence: [B, 1] (grpo)
    num_candidates: int = 20
    history_length: int = 5  # liked movies shown in the prompt, the most recent ones
    train_prefixes_per_user: int = 3  # training requests per user (next_item_requests)
    rl_prompts: int = 256  # RL prompt pool: the latest training request of this many users
    val_size: int = 300  # validation requests evaluated (the first ones); 0 = all
    test_size: int = 0  # test requests evaluated; 0 = all
    embedding_dim: int = 64  # k of the truncated SVD behind S_PAS
    candidate_seed: int = 0
    constrained_decoding: bool = True  # line 1 starts with a candidate, the box names one (CandidateConstraint)

    reward_setting: ClassVar[str | None] = "task.reward_unit"  # the key that changes reward_shape()

    def reward_shape(self) -> str:
        """The kind of reward this task gives (a key of algorithms.base.REWARD_SHAPES)."""
        return "lines" if self.reward_unit == "line" else "sequence"

    def __post_init__(self) -> None:
        check_choice("reward_form", self.reward_form, REWARD_FORMS)
        check_choice("reward_unit", self.reward_unit, REWARD_UNITS)
        for name in ("query_weight", "preference_weight"):
            value = getattr(self, name)
            check(np.isfinite(value) and value >= 0, name, value, "must be a finite number >= 0")
            check(self.reward_form == "paper" or value == 0.01, name, value,
                  "is a paper-form weight; the code form's weights are fixed at 0.01 (use task.reward_form=paper)")
        check(self.num_candidates >= 2, "num_candidates", self.num_candidates, "must be >= 2")
        for name in ("history_length", "train_prefixes_per_user", "rl_prompts", "embedding_dim"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("val_size", "test_size"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0 (0 = the whole split)")


@dataclass(frozen=True)
class ChoiceRequest:
    """One multiple-choice request: what the prompt shows and what the reward needs."""

    user_id: int
    split: str
    cutoff: int
    history_item_ids: tuple[int, ...]  # every item rated before the cutoff (the baselines' input)
    shown_item_ids: tuple[int, ...]  # the history lines of the prompt, oldest first
    candidate_item_ids: tuple[int, ...]
    candidate_names: tuple[str, ...]  # "Title (Year)"
    target_index: int
    prompt: str

    @property
    def target_item_id(self) -> int:
        return self.candidate_item_ids[self.target_index]

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class Outcome:
    """What one completion did: its box, the candidate it names, the reward terms and RAAE's line flags."""

    has_box: bool
    chosen_index: int | None
    hit: float  # NDCG@1
    query_alignment: float
    preference_alignment: float
    reward: float
    penalised: tuple[bool, ...]  # one per raw line


# ----------------------------------------------------------------------------- data


def collaborative_item_embeddings(interactions: np.ndarray, dim: int) -> np.ndarray:
    """M = V_k Σ_k [items, k] from the rank-k SVD X ≈ U_k Σ_k V_k^T of a user x item matrix X [users, items].

    Row i is item i's column of X in the basis U_k, so cos(M_i, M_j) is the cosine of the two
    items' columns of the rank-k approximation; an item without interactions gets a zero row.
    Computed as M = X^T U_k with U_k the top-k eigenvectors of X X^T = U Σ² U^T.
    """
    matrix = np.asarray(interactions, dtype=np.float64)  # [users, items]
    if matrix.ndim != 2:
        raise ValueError(f"interactions must be a [users, items] matrix, got shape {matrix.shape}")
    eigenvalues, eigenvectors = np.linalg.eigh(matrix @ matrix.T)  # ascending: [users], [users, users]
    k = min(dim, int((eigenvalues > 1e-9 * max(eigenvalues.max(initial=0.0), 1.0)).sum()))
    top = eigenvectors[:, ::-1][:, :k]  # [users, k] left singular vectors U_k
    return (matrix.T @ top).astype(np.float32)  # [items, k] = V_k Σ_k


def _name_key(name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def sample_candidates(target_item_id: int, known_item_ids: set[int], names: dict[int, str], pool: np.ndarray,
                      count: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """(candidate ids, target index): the target and count - 1 negatives drawn uniformly from ``pool`` (the
    recommendable item ids, ascending; ``names`` gives their "Title (Year)") outside ``known_item_ids``, all
    distinct as names; the target's index is drawn after them."""
    used = {_name_key(names[target_item_id])}
    negatives: list[int] = []
    for item_id in rng.permutation(pool).tolist():
        if len(negatives) == count - 1:
            break
        key = _name_key(names[item_id])
        if item_id in known_item_ids or key in used:
            continue
        used.add(key)
        negatives.append(item_id)
    if len(negatives) < count - 1:
        raise ValueError(f"only {len(negatives)} unseen items can be negatives, {count - 1} are needed; "
                         "lower task.num_candidates")
    target_index = int(rng.integers(count))
    return negatives[:target_index] + [target_item_id] + negatives[target_index:], target_index


def _genres(graph: ItemGraph, item_id: int) -> list[str]:
    return sorted(attribute[len(GENRE_KIND) + 1:] for attribute in graph.attributes(item_id)
                  if attribute.startswith(GENRE_KIND + ":"))


def prompt_text(shown_item_ids: list[int], liked: bool, candidate_names: list[str], graph: ItemGraph) -> str:
    history = "\n".join(f"{format_item(graph.movies[i].item)}: {', '.join(_genres(graph, i)) or 'no genre'}"
                        for i in shown_item_ids)
    what = "Movies I liked recently" if liked else "Movies I watched recently"
    return (f"{what}, the most recent last:\n{history}\n\nCandidates:\n" + "\n".join(candidate_names)
            + "\n\nWhich candidate will I like next? Reason in a few short lines, then answer \\boxed{Title (Year)}.")


def _and_join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _shared_attributes(graph: ItemGraph, item_id: int, other_id: int) -> list[str]:
    """Attributes both items have, readable: people (director, actor, writer, producer; within a kind the
    most frequent in ML-100K first), then genres (alphabetical); other kinds are not shown."""
    order = {kind: position for position, kind in enumerate(DESCRIBED_KINDS + (GENRE_KIND,))}
    shared = [attribute.split(":", 1) for attribute in graph.shared_attributes(item_id, other_id)]

    def rank(pair: list[str]) -> tuple:
        kind, value = pair
        frequency = 0 if kind == GENRE_KIND else graph.attribute_item_counts[f"{kind}:{value}"]
        return order[kind], -frequency, value

    shown = sorted((pair for pair in shared if pair[0] in order), key=rank)
    return [value if kind == GENRE_KIND else f"{kind} {value}" for kind, value in shown]


def demonstration_text(request: ChoiceRequest, graph: ItemGraph) -> str:
    """The warm start's rationale for a training request (module docstring): four lines, the last the box."""
    counts = Counter(genre for item_id in request.shown_item_ids for genre in _genres(graph, item_id))
    top = [genre for genre, _ in sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))[:TOP_GENRES_SHOWN]]
    target, name = request.target_item_id, request.candidate_names[request.target_index]
    lines = [f"I like {_and_join(top)}." if top else "I like many kinds of movies.",
             f"{name} is {', '.join(_genres(graph, target)) or 'a movie'}."]
    closest = max(reversed(request.shown_item_ids), key=lambda i: len(_shared_attributes(graph, target, i)))
    shared = _shared_attributes(graph, target, closest)[:SHARED_ATTRIBUTES_SHOWN]
    lines.append(f"It shares {', '.join(shared)} with {format_item(graph.movies[closest].item)}." if shared
                 else "Nothing I liked shares its genres or people.")
    return "\n".join(lines + [f"\\boxed{{{name}}}"])


def build_requests(conversations, graph: ItemGraph, next_item_requests: list, config: ReRecTaskConfig
                   ) -> list[ChoiceRequest]:
    """Multiple-choice requests from next-item requests (experiments/data/next_item.py), one split at a time."""
    timelines = {timeline.user_id: timeline for timeline in conversations.timelines}
    names = {item_id: format_item(item) for item_id, item in conversations.recommendable_items.items()}
    pool = np.array(sorted(names), dtype=np.int64)  # [items]
    requests = []
    for request in next_item_requests:
        timeline = timelines[request.user_id]
        part_end = {"train": timeline.train_end, "val": timeline.val_end, "test": len(timeline.item_ids)}[request.split]
        rng = np.random.default_rng([config.candidate_seed, SPLIT_CODES[request.split], request.user_id,
                                     request.cutoff])
        candidates, target_index = sample_candidates(request.target_item_id, set(timeline.item_ids[:part_end]),
                                                     names, pool, config.num_candidates, rng)
        liked = list(request.liked_history_item_ids)
        shown = (liked or [i for i in request.history_item_ids if i in names])[-config.history_length:]
        candidate_names = [names[i] for i in candidates]
        requests.append(ChoiceRequest(request.user_id, request.split, request.cutoff, request.history_item_ids,
                                      tuple(shown), tuple(candidates), tuple(candidate_names), target_index,
                                      prompt_text(shown, bool(liked), candidate_names, graph)))
    return requests


def split_rl_and_sft(train: list[ChoiceRequest], rl_prompts: int, seed: int
                     ) -> tuple[list[ChoiceRequest], list[ChoiceRequest]]:
    """(RL prompts, SFT requests): the latest training request of ``rl_prompts`` users drawn with the seed;
    SFT keeps every other training request whose (user, target) no RL prompt has."""
    latest: dict[int, ChoiceRequest] = {}
    for request in train:
        if request.user_id not in latest or request.cutoff > latest[request.user_id].cutoff:
            latest[request.user_id] = request
    users = sorted(latest)
    chosen = np.random.default_rng([seed, 1]).permutation(len(users))[:rl_prompts]
    rl = [latest[users[index]] for index in sorted(chosen.tolist())]
    held_out = {(request.user_id, request.target_item_id) for request in rl}
    sft = [request for request in train if (request.user_id, request.target_item_id) not in held_out]
    return rl, sft


# ----------------------------------------------------------------------------- constrained decoding


def _padded(rows: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists per prompt and candidate -> (table [P, K, L] padded with -1, lengths [P, K])."""
    width = max(len(tokens) for row in rows for tokens in row)
    table = torch.tensor([[tokens + [-1] * (width - len(tokens)) for tokens in row] for row in rows])
    return table, torch.tensor([[len(tokens) for tokens in row] for row in rows])


def _follow(table: torch.Tensor, lengths: torch.Tensor, completion_ids: torch.Tensor, anchor: torch.Tensor,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each row stands in its candidates' token sequences, which start at column ``anchor``.

    table [N, K, L] (-1 padded), lengths [N, K], completion_ids [N, T], anchor [N], positions [C].
    For position t, j = t - anchor tokens of a sequence are written (columns anchor .. t - 1, all
    before t). Returns next token [N, C, K], "matches so far and continues" [N, C, K] and
    "matches and is complete" [N, C, K]; both False outside 0 <= j <= L.
    """
    num_rows, num_candidates, width = table.shape
    span = (anchor[:, None] + torch.arange(width, device=table.device)).clamp(0, completion_ids.shape[1] - 1)
    written = completion_ids.gather(1, span)  # [N, L]
    matches = (written[:, None, :] == table).long()  # [N, K, L]
    ones = torch.ones_like(matches[:, :, :1])
    prefix_ok = torch.cat([ones, matches.cumprod(dim=2)], dim=2).bool()  # [N, K, L + 1]: first j tokens match
    offset = positions[None, :] - anchor[:, None]  # [N, C]
    inside = (offset >= 0) & (offset <= width)
    step = offset.clamp(0, width)  # [N, C]
    index = step[:, None, :].expand(num_rows, num_candidates, -1)  # [N, K, C]
    ok = prefix_ok.gather(2, index).transpose(1, 2) & inside[:, :, None]  # [N, C, K]
    padded = torch.cat([table, torch.full_like(table[:, :, :1], -1)], dim=2)  # [N, K, L + 1]
    next_token = padded.gather(2, index).transpose(1, 2)  # [N, C, K]
    written_length = step[:, :, None]  # [N, C, 1]
    return next_token, ok & (written_length < lengths[:, None, :]), ok & (written_length == lengths[:, None, :])


class CandidateConstraint:
    """Logits hook (engine.logprobs.LogitsHook): the second line starts with a candidate, a box names one.

    The grammar the warm start teaches (``demonstration_text``) has two places that name the pick: the
    start of line 1 (0-based) and the box. With s the first position of line 1 (exactly one newline
    before it) and b the first "\\" token, at completion position t:

        t > b           the next token of a candidate's "\\boxed{Title (Year)}" whose prefix matches
                        columns b .. t-1; EOS once one is complete (the completion ends with its box)
        t >= s, t < b   the next token of a candidate's "Title (Year)" matching columns s .. t-1, until
                        one is complete; then free
        otherwise       free

    A tiny model trained from scratch does not learn to copy one of 20 titles from its prompt within
    our budget (docs/rerec.md); this supplies the copy, and the model still chooses which candidate.
    Everything is computed with tensor ops from the tokens before each position, so the learner's
    recompute (engine/logprobs.py) applies the sampler's mask and its log-probs equal the sampler's.
    """

    def __init__(self, name_tokens: list[list[list[int]]], box_tokens: list[list[list[int]]],
                 newline_counts: torch.Tensor, backslash_id: int, eos_id: int):
        self.names, self.name_lengths = _padded(name_tokens)  # [P, K, L1], [P, K]
        self.boxes, self.box_lengths = _padded(box_tokens)  # [P, K, L2], [P, K]
        self.newline_counts, self.backslash_id, self.eos_id = newline_counts, backslash_id, eos_id

    @classmethod
    def build(cls, tokenizer, candidate_names: list[tuple[str, ...]]) -> "CandidateConstraint":
        """The constraint for prompts whose candidates are ``candidate_names`` (one tuple per prompt index)."""
        from algorithms.base import newline_counts

        backslash = tokenizer("\\", add_special_tokens=False)["input_ids"]
        if len(backslash) != 1:
            raise ValueError("the tokenizer writes a backslash as several tokens; the box constraint needs one")
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        boxes = [[encode(f"\\boxed{{{name}}}") for name in names] for names in candidate_names]
        if any(tokens[0] != backslash[0] for row in boxes for tokens in row):
            raise ValueError("a box does not start with the backslash token; the box constraint needs it to")
        return cls([[encode(name) for name in names] for names in candidate_names], boxes,
                   newline_counts(tokenizer), backslash[0], tokenizer.eos_token_id)

    def __call__(self, logits: torch.Tensor, prompt_indices: torch.Tensor, completion_ids: torch.Tensor,
                 start: int) -> torch.Tensor:
        num_rows, width, vocab_size = logits.shape  # [N, C, V]
        device = logits.device
        if prompt_indices is None or bool(((prompt_indices < 0) | (prompt_indices >= len(self.names))).any()):
            raise ValueError(f"the candidate constraint needs prompt indices in [0, {len(self.names)}) for every row")
        rows = prompt_indices.long().cpu()
        positions = start + torch.arange(width, device=device)  # [C]
        never = torch.full((num_rows,), completion_ids.shape[1] + width + 1, device=device)  # [N]
        newlines = self.newline_counts.to(device)[completion_ids.clamp(0, len(self.newline_counts) - 1)]  # [N, T]
        lines_before = newlines.cumsum(dim=1) - newlines  # [N, T]
        on_line_one = lines_before == 1
        line_start = torch.where(on_line_one.any(1), on_line_one.long().argmax(1), never)  # [N]
        is_backslash = completion_ids == self.backslash_id
        box_start = torch.where(is_backslash.any(1), is_backslash.long().argmax(1), never)  # [N]

        box_next, box_open, box_done = _follow(self.boxes[rows].to(device), self.box_lengths[rows].to(device),
                                               completion_ids, box_start, positions)  # [N, C, K] each
        name_next, name_open, name_done = _follow(self.names[rows].to(device), self.name_lengths[rows].to(device),
                                                  completion_ids, line_start, positions)
        in_box = (box_start[:, None] < positions[None, :]) & (box_open | box_done).any(2)  # [N, C]
        in_name = ~in_box & name_open.any(2) & ~name_done.any(2)  # [N, C]
        open_tokens = torch.where(in_box[:, :, None], torch.where(box_open, box_next, vocab_size),
                                  torch.where(name_open, name_next, vocab_size))  # [N, C, K]; V = nothing
        allowed = torch.zeros(num_rows, width, vocab_size + 1, dtype=torch.bool, device=device)
        allowed.scatter_(2, open_tokens, True)
        allowed[:, :, self.eos_id] |= in_box & box_done.any(2)
        constrained = in_box | in_name  # [N, C]
        return logits.masked_fill(constrained[:, :, None] & ~allowed[:, :, :vocab_size], float("-inf"))


# ----------------------------------------------------------------------------- the task


class ReRecTask:
    """Multiple-choice next-item recommendation with reasoning (module docstring)."""

    selection_metric = "hit@1"

    def __init__(self, config: ReRecTaskConfig, graph: ItemGraph, item_embeddings: np.ndarray,
                 rl_requests: list[ChoiceRequest], sft_requests: list[ChoiceRequest],
                 val: list[ChoiceRequest], test: list[ChoiceRequest], conversations=None, fingerprint: str = ""):
        if not rl_requests:
            raise ValueError("the ReRec task has no RL prompts: the training split gave no request")
        self.config, self.graph, self.item_embeddings = config, graph, item_embeddings
        self.rl_requests, self.sft_requests = rl_requests, sft_requests
        self.conversations, self.fingerprint = conversations, fingerprint
        self.splits = {"val": val[:config.val_size] if config.val_size else val,
                       "test": test[:config.test_size] if config.test_size else test}
        self.hooks: dict[str, CandidateConstraint] = {}  # per split, built by bind()
        self.logits_hook: CandidateConstraint | None = None  # the training prompts' constraint (the trainer's)

    def bind(self, model, tokenizer) -> None:
        """Build the constrained-decoding hooks (they need the tokenizer's ids); a no-op when switched off."""
        if self.config.constrained_decoding:
            requests = {"train": self.rl_requests, **self.splits}
            self.hooks = {split: CandidateConstraint.build(tokenizer, [r.candidate_names for r in rows])
                          for split, rows in requests.items()}
            self.logits_hook = self.hooks["train"]

    # --- rewards ------------------------------------------------------------
    def score(self, request: ChoiceRequest, completion: str) -> Outcome:
        """Reward terms of one completion (module docstring)."""
        if not isinstance(completion, str):
            raise TypeError(f"a completion must be a str, got {type(completion).__name__}")
        answer = first_boxed(completion)
        chosen = match_candidate(answer, request.candidate_names)
        hit = ndcg_at_1(chosen, request.target_index)
        qas = pas = 0.0
        if chosen is not None:
            item, target = request.candidate_item_ids[chosen], request.target_item_id
            qas = query_alignment(self.graph.attributes(item), self.graph.attributes(target))
            pas = preference_alignment(self.item_embeddings[item], self.item_embeddings[target])
        if self.config.reward_form == "paper":
            reward = paper_reward(chosen, request.target_index, qas, pas, self.config.query_weight,
                                  self.config.preference_weight)
        else:
            reward = code_reward(answer is not None, chosen, request.target_index, qas, pas)
        flags = penalised_lines(completion, answer, request.candidate_names[request.target_index])
        return Outcome(answer is not None, chosen, hit, qas, pas, reward, tuple(flags))

    def num_train_prompts(self) -> int:
        return len(self.rl_requests)

    def train_messages(self, index: int) -> list[dict]:
        return self.rl_requests[index].messages

    def rewards(self, prompt_indices: list[int], completions: list[str], rollout=None) -> Rewards:
        """Per-line rewards [B, U] (or [B, 1] with reward_unit "sequence") and RAAE / curriculum extras."""
        outcomes = [self.score(self.rl_requests[i], text) for i, text in zip(prompt_indices, completions)]
        reward = torch.tensor([outcome.reward for outcome in outcomes], dtype=torch.float32)  # [B]
        hits = torch.tensor([outcome.hit for outcome in outcomes], dtype=torch.float32)  # [B]
        if self.config.reward_unit == "sequence":
            return Rewards(reward[:, None], torch.ones(len(outcomes), 1, dtype=torch.bool), {"ndcg_at_1": hits})
        lines = [text.split("\n") for text in completions]
        width = max(len(row) for row in lines)
        mask = torch.zeros(len(lines), width, dtype=torch.bool)  # [B, U]
        penalised = torch.zeros(len(lines), width)  # [B, U]
        for row, (text_lines, outcome) in enumerate(zip(lines, outcomes)):
            mask[row, :len(text_lines)] = torch.tensor([bool(line.strip()) for line in text_lines])
            penalised[row, :len(text_lines)] = torch.tensor(outcome.penalised, dtype=torch.float32)
        return Rewards(reward[:, None].expand(-1, width).contiguous(), mask, {"penalised": penalised,
                                                                              "ndcg_at_1": hits})

    # --- warm start ---------------------------------------------------------
    def demonstrations(self) -> tuple[list[list[dict]], list[str]]:
        return ([request.messages for request in self.sft_requests],
                [demonstration_text(request, self.graph) for request in self.sft_requests])

    def corpus(self) -> list[str]:
        """Tokenizer text: training prompts, demonstrations, every catalog title and genre."""
        chats, answers = self.demonstrations()
        titles = [format_item(movie.item) for movie in self.graph.movies.values()]
        genres = sorted({genre for item_id in self.graph.movies for genre in _genres(self.graph, item_id)})
        return ([chat[0]["content"] for chat in chats] + answers + [r.prompt for r in self.rl_requests]
                + titles + genres)

    def warm_start(self, model, tokenizer, config) -> list[dict]:
        """Behaviour cloning on ``demonstrations()`` (engine/sft.py), cached under what it depends on only
        (model, SFT settings, lengths, seed, data, tokenizer and the ``DEMONSTRATION_FIELDS``), so variants
        that differ in rewards or evaluation share one checkpoint."""
        from engine.sft import supervised_finetune

        identity = {"sft": dataclasses.asdict(config.sft), "model": dataclasses.asdict(config.model),
                    "seed": config.seed, "max_prompt_length": config.trainer.max_prompt_length,
                    "max_new_tokens": config.sampling.max_new_tokens, "data": self.fingerprint,
                    "tokenizer": sorted(tokenizer.get_vocab().items()),
                    "task": {name: getattr(self.config, name) for name in DEMONSTRATION_FIELDS}}

        def train() -> list[dict]:
            chats, answers = self.demonstrations()
            print(f"SFT: {config.sft.steps} steps on {len(chats)} demonstrations")
            return supervised_finetune(model, tokenizer, chats, answers, config.sft, seed=config.seed,
                                       max_prompt_length=config.trainer.max_prompt_length,
                                       max_completion_length=config.sampling.max_new_tokens,
                                       on_step=sft_progress(config.sft.steps, "sft"))

        return cached_stage(model, "rerec-demonstrations", identity, train)

    # --- evaluation ---------------------------------------------------------
    def outcomes(self, split: str, completions: list[str]) -> list[Outcome]:
        return [self.score(request, text) for request, text in zip(self.splits[split], completions)]

    def generate(self, generate: Callable[..., list[str]], split: str) -> list[str]:
        """Greedy completions of a split's requests, under the split's constraint when there is one."""
        requests = self.splits[split]
        return generate([request.messages for request in requests], prompt_indices=list(range(len(requests))),
                        logits_hook=self.hooks.get(split))

    def evaluate(self, generate: Callable[..., list[str]], split: str = "test") -> dict[str, float]:
        completions = self.generate(generate, split)
        return summarize(self.outcomes(split, completions), completions)


def reasoning_lines(completion: str) -> list[str]:
    """The non-blank lines that hold no box."""
    return [line for line in completion.split("\n") if line.strip() and "\\boxed" not in line]


def summarize(outcomes: list[Outcome], completions: list[str]) -> dict[str, float]:
    """Hit@1 (= mean NDCG@1), mean reward, well-formed fraction (a box exists), fraction of answers naming a
    candidate, mean reasoning length (non-blank lines without a box; their words), mean S_QAS / S_PAS."""
    if not outcomes:
        raise ValueError("no requests to evaluate")
    reasoning = [reasoning_lines(text) for text in completions]
    return {
        "hit@1": float(np.mean([outcome.hit for outcome in outcomes])),
        "reward": float(np.mean([outcome.reward for outcome in outcomes])),
        "well_formed_frac": float(np.mean([outcome.has_box for outcome in outcomes])),
        "in_candidates_frac": float(np.mean([outcome.chosen_index is not None for outcome in outcomes])),
        "reasoning_lines": float(np.mean([len(lines) for lines in reasoning])),
        "reasoning_words": float(np.mean([sum(len(line.split()) for line in lines) for lines in reasoning])),
        "query_alignment": float(np.mean([outcome.query_alignment for outcome in outcomes])),
        "preference_alignment": float(np.mean([outcome.preference_alignment for outcome in outcomes])),
    }


def build_rerec_task(config, data_dir: str | None) -> tuple[ReRecTask, list[str], str, str]:
    """(task, tokenizer corpus, data source, data fingerprint) for an experiment's config."""
    from experiments.data.cache import fingerprint_digests
    from experiments.data.item_graph import load_item_graph
    from experiments.data.movielens import build_conversations, load_movielens_ratings
    from experiments.data.next_item import next_item_requests

    settings = config.task
    ratings = load_movielens_ratings(data_dir, progress=False)
    conversations = build_conversations(ratings, train_cuts_per_user=0)
    graph = load_item_graph(ratings)
    requests = {split: build_requests(conversations, graph, next_item_requests(
        conversations, split, prefixes_per_user=settings.train_prefixes_per_user if split == "train" else None),
        settings) for split in ("train", "val", "test")}
    rl, sft = split_rl_and_sft(requests["train"], settings.rl_prompts, settings.candidate_seed)
    embeddings = collaborative_item_embeddings(conversations.interaction_matrix("train"), settings.embedding_dim)
    knowledge_graph = {name: hashlib.sha256((Path(ratings.directory) / name).read_bytes()).hexdigest()
                       for name in ("ml-100k.kg", "ml-100k.link") if (Path(ratings.directory) / name).is_file()}
    fingerprint = fingerprint_digests({**ratings.file_digests, **knowledge_graph})
    task = ReRecTask(settings, graph, embeddings, rl, sft, requests["val"], requests["test"], conversations,
                     fingerprint)
    print(f"data: MovieLens-100K multiple choice, {settings.num_candidates} candidates: {len(rl)} RL prompts, "
          f"{len(sft)} SFT demonstrations, {len(task.splits['val'])} val / {len(task.splits['test'])} test requests")
    return task, task.corpus(), "movielens-100k", fingerprint


# ----------------------------------------------------------------------------- baselines and statistics


def candidate_baseline_hits(task: ReRecTask, split: str = "test") -> dict[str, np.ndarray]:
    """Per-request Hit@1 of choosing among the same candidates by popularity or by EASE's score.

    Popularity = users who rated the item; EASE (experiments/baselines.py) with lambda chosen on
    validation Hit@1. Both are fit on the train part for "val" and refit on train + validation for
    "test", the protocol of ``baselines_ml100k``. Ties go to the earlier candidate.
    """
    from experiments.baselines import EASERecommender

    def hits(scores_of: Callable[[ChoiceRequest], np.ndarray], requests: list[ChoiceRequest]) -> np.ndarray:
        return np.array([float(np.argmax(scores_of(r)[list(r.candidate_item_ids)]) == r.target_index)
                         for r in requests])

    def ease_hits(matrix: np.ndarray, l2: float, requests: list[ChoiceRequest]) -> np.ndarray:
        model = EASERecommender(l2).fit(matrix)
        return hits(lambda request: model.scores(request.history_item_ids), requests)

    conversations = task.conversations
    part = "train" if split == "val" else "train+val"
    matrix = conversations.interaction_matrix(part)
    popularity = matrix.sum(axis=0)
    train_matrix = conversations.interaction_matrix("train")
    l2 = max(EASE_L2_GRID, key=lambda value: ease_hits(train_matrix, value, task.splits["val"]).mean())
    return {"popularity": hits(lambda request: popularity, task.splits[split]),
            f"ease (lambda {l2:g})": ease_hits(matrix, l2, task.splits[split])}


# ----------------------------------------------------------------------------- the results table


def _checkpoint_of(path: Path) -> tuple[Path, Path | None]:
    """(model folder, run directory or None): a run directory's best checkpoint, or a save_pretrained folder."""
    if (path / "checkpoints" / "best").is_dir():
        return path / "checkpoints" / "best", path
    if (path / "model.safetensors").is_file():
        return path, None
    raise SystemExit(f"error: {path} is neither a run directory with checkpoints/best nor a model folder")


def table(rows: list[tuple[str, Path]], reference_run: Path, data_dir: str | None, out: Path,
          resamples: int = 10_000, test_size: int | None = None) -> dict:
    """Test metrics of each row's checkpoint, baselines and paired bootstrap intervals vs SFT and GRPO.

    The requests are the reference run's (its task settings); ``test_size`` (0 = the whole test split)
    replaces its ``task.test_size``, so runs that skipped the test split can be evaluated on all of it here.
    """
    from types import SimpleNamespace

    from engine.trainer import completion_stop_ids, greedy_generate
    from fastdecode import fast_decoder
    from models.loader import load_model_and_tokenizer

    config = json.loads((reference_run / "config.json").read_text())["config"]
    task_settings = {**config["task"], **({} if test_size is None else {"test_size": test_size})}
    task, _, _, _ = build_rerec_task(SimpleNamespace(task=ReRecTaskConfig(**task_settings)), data_dir)
    max_new_tokens, prompt_length = config["sampling"]["max_new_tokens"], config["trainer"]["max_prompt_length"]
    results = {"seed": config["seed"], "candidate_seed": task.config.candidate_seed, "rows": {}, "baselines": {},
               "test_requests": len(task.splits["test"]), "bootstrap_resamples": resamples}
    hits = {}
    for name, path in rows:
        folder, run_dir = _checkpoint_of(path)
        model, tokenizer = load_model_and_tokenizer(str(folder))
        model.eval()
        task.bind(model, tokenizer)
        stop_ids = completion_stop_ids(task, tokenizer, model)
        completions = task.generate(lambda chats, prompt_indices=None, logits_hook=None: greedy_generate(
            model, tokenizer, chats, max_new_tokens, prompt_length, config["trainer"]["eval_batch_size"], stop_ids,
            fast_decoder, prompt_indices, logits_hook), "test")
        outcomes = task.outcomes("test", completions)
        row = summarize(outcomes, completions)
        row["checkpoint"] = str(folder)
        if run_dir is not None:
            task_settings = json.loads((run_dir / "config.json").read_text())["config"]["task"]
            differing = [name for name in DEMONSTRATION_FIELDS if task_settings.get(name) != getattr(task.config, name)]
            if differing:
                raise SystemExit(f"error: {run_dir} was trained with other task.{differing[0]} than the reference run; "
                                 "rows must share the requests and candidates")
            selection = read_selection(run_dir)  # the trainer's validation choice
            row["best_step"], row["val_hit@1"] = selection["best_step"], selection["best_value"]
            row["settings"] = json.loads((run_dir / "config.json").read_text())["command"]
        results["rows"][name] = row
        hits[name] = np.array([outcome.hit for outcome in outcomes])
    for reference in ("SFT", "GRPO"):
        if reference in hits:
            for name in hits:
                if name != reference:
                    results["rows"][name][f"hit@1 - {reference} (95% CI)"] = interval_dict(
                        hits[name], hits[reference], resamples)
    results["baselines"]["random"] = {"hit@1": 1.0 / task.config.num_candidates}
    for name, baseline in candidate_baseline_hits(task, "test").items():
        results["baselines"][name] = {"hit@1": float(baseline.mean())}
    out.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("python -m experiments.rerec_task", table.__doc__)
    parser.add_argument("--test-size", type=int,
                        help="test requests to evaluate, 0 = all (default: the reference run's)")
    args = parser.parse_args(argv)
    results = table(named_rows(args.rows), Path(args.reference_run), args.data_dir, Path(args.out), args.resamples,
                    args.test_size)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
