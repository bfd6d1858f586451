"""R²ec on MovieLens-100K: reason about a user's history, then rank the whole catalogue from h_T.

R²ec (You et al., arXiv 2505.16994, NeurIPS 2025; docs/recpo.md) trains one decoder with two
heads: the language head writes a reasoning path that ends with the token ``<answer>``, and a
recommendation head scores every item from the last hidden state there, h_T. This module is the
task side of it (the RecPO credit assignment is algorithms/recpo.py): prompts, the item head and
item table, the rewards, the stage-1 warm start and the evaluation.

Requests. The per-user temporal split of ``baselines_ml100k`` (experiments/data/movielens.py):

* training: next-item requests from the train part of each user's history
  (experiments/data/next_item.py), ``prefixes_per_user`` cutoffs per user, one target each;
* validation / test: the 854 / 833 users of ``baselines_ml100k``, with their histories (train,
  resp. train + validation part) and ground truth (the liked items of the next part).

A prompt shows the user's ``history_window`` most recent rated movies, "Title (Year): rating",
oldest first, and asks to reason and end with ``<answer>`` (an empty history says so).

The head (models/rec_head.py). h_v is the backbone's last hidden state at the end of an item
prompt ("Describe this movie: <title (year); genres; director, actor, writer, producer from
the knowledge graph>", ``ItemGraph.describe``) whose assistant turn is prefilled with ``<answer>``;
score s(u, v) = cos(h_T, h_v) / tau, tau = 0.02 (``similarity = dot`` gives the paper's inner
product). The item table H_V [I, H] over the catalogue (the 1,681 items with a year) is encoded
without gradient at the first RL step and every ``refresh_every`` steps after it (Algorithm 1,
line 3); at every step the batch's target items are re-encoded and their rows overwritten
before the rewards are computed (line 5). The refresh time is recorded (``table_refresh_s``).

Rewards, per sampled path (one no-grad forward of prompt + path gives h_T at ``<answer>``):
the target's rank among all catalogue items with the user's history removed (pessimistic ties,
rewards/recpo.py) gives R_d = NDCG@k (k = ``ndcg_k``, the code's 1000), returned as the reward
[B, 1]; R_c = the target's softmax probability over the same candidates is an extra, and RecPO
fuses the two (algorithms/recpo.py). Extras: ``catalog_probability``, ``target_item`` (table
row), ``reached_answer`` and ``user_hidden`` (h_T [B, H], for pi_old of the item action). A path
that stopped without ``<answer>`` (EOS, or the token budget) scores R_d = R_c = 0 and is marked
``reached_answer = False``.

Stage 1 (``warm_start``), the stand-in for the paper's LLM-written reasoning: a tiny model
trained from scratch cannot reason, so it first imitates rationales built from the data for
each training request: the liked history movies that share most attributes with the target,
then the target's decade, the genres it shares with the history and up to two people (director,
actor, writer) it shares with the history, then ``<answer>``. Only training requests are used
(history and target inside the train part). In the same steps the head is warmed up from h_T
after the rationale and from h_T of the prompt with ``<answer>`` right after it (no reasoning),
so that the stage-1 model can also be evaluated as a head without reasoning:

    L = -(1/|y|) sum_t log pi(y_t | x, y_<t)
        + w * (1/2) [ -log p(v+ | h_T^reason) - log p(v+ | h_T^direct) ]

With ``warm_start_softmax = in_batch`` (the default, what ``recpo_ml100k`` measured) p is the
softmax over the batch's distinct target items, the item policy of the RL loss (paper Eq. 6).
With ``catalogue`` p is R_c, the softmax over the whole catalogue with the user's history left
out, i.e. the metric's setting: the table (re-encoded every ``refresh_every`` steps, no
gradient) scores the other items and the batch's targets are re-encoded with gradient (their
columns and table rows replaced, as in RL). It is an option whose full run was not measured
(docs/recpo.md §8).

Evaluation (``evaluate``): the whole table is re-encoded (a local copy; the training table is
untouched), each user's reasoning is decoded greedily, ``<answer>`` is appended (as the
official prompter does when it is missing) and the re-tokenised text gives h_T; the catalogue
is ranked with the user's seen items removed and the top ``list_length`` items are scored with
``experiments.baselines.items_from_scores`` and ``rewards.ranking.evaluate_list``: the
Recall@K / NDCG@K of ``baselines_ml100k`` on the same users. ``head_only/...`` metrics score h_T
of the prompt with ``<answer>`` prefilled (no reasoning). Validation NDCG@10 chooses the
reported checkpoint.

``python -m experiments.recpo_task --reference-run RUN NAME=RUN_OR_MODEL ... --out FILE``
re-evaluates checkpoints on the test users and writes the table with paired bootstrap
intervals (``experiments.statistics.paired_bootstrap``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.config import check, check_choice
from engine.learner import Rewards, lr_multiplier
from engine.logging import read_metrics
from engine.logprobs import completion_logprobs, unwrap_model
from engine.tokens import encode_prompts, pad_token_lists
from experiments.baselines import items_from_scores
from experiments.data.common import RecExample
from experiments.data.item_graph import ItemGraph
from experiments.data.movielens import LIKED_RATING
from experiments.run_records import named_rows, read_selection, table_parser
from experiments.statistics import interval_dict
from experiments.warm_start import cached_stage
from models.rec_head import SIMILARITIES, ItemScorer, ItemTable, RecHeadConfig, encode_items
from rewards.lists import format_item
from rewards.ranking import evaluate_list
from rewards.recpo import catalog_probability, ndcg_reward, target_ranks

ANSWER = "<answer>"
ITEM_INSTRUCTION = "Describe this movie: "
REQUEST = "Think about what I like, then recommend the movie I will watch next. End your reasoning with <answer>."
PEOPLE_KINDS = ("director", "actor", "writer")
# the settings stage 1 depends on (its checkpoint is shared by runs that differ only in the others)
STAGE1_FIELDS = ("prefixes_per_user", "history_window", "item_facts", "similarity", "temperature",
                 "head_loss_weight", "warm_start_softmax", "refresh_every")
WARM_START_SOFTMAXES = ("catalogue", "in_batch")


@dataclass
class RecPOTaskConfig:
    prefixes_per_user: int | None = 10  # training requests per user (next_item.py); None = every usable prefix
    history_window: int = 10  # most recent rated movies in a prompt (the paper shows 20)
    item_facts: int = 4  # people in an item description (ItemGraph.describe)
    similarity: str = "cosine"  # cosine (official code) | dot (the paper's h_T . h_v)
    temperature: float = 0.02  # tau
    ndcg_k: int = 1000  # cut-off of the ranking reward R_d
    refresh_every: int = 10  # T_refresh: RL steps between full re-encodings of the item table
    item_batch_size: int = 64  # prompts per forward when encoding items
    head_loss_weight: float = 1.0  # w: the head's softmax in stage 1
    warm_start_softmax: str = "in_batch"  # stage-1 head loss over the batch's targets or the catalogue (table)
    list_length: int = 20  # items ranked for the metrics (Recall / NDCG @5/10/20)
    val_size: int = 300  # the first val_size validation users choose the checkpoint; 0 = all 854
    test_size: int = 0  # the first test_size test users are evaluated; 0 = all 833 (the baselines' table)
    eval_head_only: bool = True  # also report head_only/... (h_T of the prompt alone, no reasoning)

    def reward_shape(self) -> str:
        """The kind of reward this task gives (a key of algorithms.base.REWARD_SHAPES)."""
        return "item_head"  # R_d per path, the item head's catalogue probability in the extras

    def __post_init__(self) -> None:
        check(self.prefixes_per_user is None or self.prefixes_per_user >= 1, "prefixes_per_user",
              self.prefixes_per_user, "must be >= 1 (or none for every usable prefix)")
        check(self.history_window >= 1, "history_window", self.history_window, "must be >= 1")
        check(self.item_facts >= 0, "item_facts", self.item_facts, "must be >= 0")
        check_choice("similarity", self.similarity, SIMILARITIES)
        check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        check(self.ndcg_k >= 1, "ndcg_k", self.ndcg_k, "must be >= 1")
        for name in ("refresh_every", "item_batch_size", "list_length"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        check(self.head_loss_weight >= 0, "head_loss_weight", self.head_loss_weight, "must be >= 0")
        check_choice("warm_start_softmax", self.warm_start_softmax, WARM_START_SOFTMAXES)
        check(self.val_size >= 0, "val_size", self.val_size, "must be >= 0 (0 = every user)")
        check(self.test_size >= 0, "test_size", self.test_size, "must be >= 0 (0 = every user)")


@dataclass(frozen=True)
class Request:
    """One prompt: the user turn, the table rows of the items to exclude, and what it is scored against.

    Training requests have a ``target_row`` and a stage-1 ``rationale``; val / test requests an
    ``example`` (ground truth and seen items, as ``baselines_ml100k`` scores them).
    """

    prompt: str
    history_rows: tuple[int, ...]
    target_row: int | None = None
    rationale: str = ""
    example: RecExample | None = None


# ----------------------------------------------------------------------------- texts


def user_prompt(history: list[tuple[str, float]]) -> str:
    """The user turn from (``Title (Year)``, rating) pairs, oldest first."""
    if not history:
        return "I have not rated any movie yet.\n\n" + REQUEST
    lines = "\n".join(f"{title}: {rating:g}" for title, rating in history)
    return f"Movies I rated, the most recent last (rating out of 5):\n{lines}\n\n{REQUEST}"


def write_rationale(graph: ItemGraph, shown: list[tuple[int, float]], target_item_id: int) -> str:
    """A stage-1 demonstration (module docstring) from the shown history (item id, rating) and the target."""
    liked = [item for item, rating in shown if rating >= LIKED_RATING] or [item for item, _ in shown]
    overlap = {item: len(graph.shared_attributes(item, target_item_id)) for item in liked}
    anchors = sorted((item for item in liked if overlap[item] > 0),
                     key=lambda item: (-overlap[item], -liked.index(item)))[:2]  # most shared, then most recent
    seen_attributes = set().union(*(graph.attributes(item) for item, _ in shown)) if shown else set()
    genres = graph.values(target_item_id, "genre")
    shared_genres = [genre for genre in genres if f"genre:{genre}" in seen_attributes] or genres
    people = [f"{kind} {value}" for kind in PEOPLE_KINDS for value in graph.values(target_item_id, kind)
              if f"{kind}:{value}" in seen_attributes][:2]
    year = graph.movies[target_item_id].year
    opening = ("You liked " + " and ".join(format_item(graph.movies[item].item) for item in anchors) + "."
               if anchors else "Your history points in several directions.")
    decade = f"{year // 10 * 10}s " if year else ""
    what = f"Next: a {decade}{', '.join(shared_genres)} movie" if shared_genres else f"Next: a {decade}movie"
    return f"{opening} {what}{' with ' + ', '.join(people) if people else ''}."


def restore_saved_pre_tokenizer(tokenizer) -> None:
    """Give a tokenizer loaded from a local folder the pre-tokenizer saved in its tokenizer.json.

    transformers 5's ``AutoTokenizer`` loads a tiny model's folder as the tokenizer class of the
    model type (``Qwen2Tokenizer``), which replaces the saved byte-level pre-tokenizer with
    Qwen's (digits one by one): the stage-1 checkpoint would then see other token ids in RL and
    evaluation than it was trained on ("1992" is one token, then four). A checkpoint whose saved
    pre-tokenizer is the one in use (a real Qwen folder, a hub id) is left alone.
    """
    from tokenizers import Tokenizer

    saved = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "tokenizer.json"
    if not saved.is_file() or not hasattr(tokenizer, "backend_tokenizer"):
        return
    pre_tokenizer = Tokenizer.from_file(str(saved)).pre_tokenizer
    if pre_tokenizer is not None and repr(pre_tokenizer) != repr(tokenizer.backend_tokenizer.pre_tokenizer):
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizer


def item_messages(description: str) -> list[dict]:
    return [{"role": "user", "content": ITEM_INSTRUCTION + description}]


# ----------------------------------------------------------------------------- the task


class RecPOTask:
    """Next-item recommendation with a reasoning path and an item-scoring head (module docstring)."""

    selection_metric = "ndcg@10"

    def __init__(self, config: RecPOTaskConfig, item_ids: list[int], item_descriptions: list[str],
                 train: list[Request], val: list[Request], test: list[Request], ranking_space,
                 max_prompt_length: int = 512, fingerprint: str = ""):
        if not train:
            raise ValueError("the RecPO task has no training requests")
        if len(item_ids) != len(item_descriptions) or not item_ids:
            raise ValueError(f"{len(item_ids)} item ids but {len(item_descriptions)} item descriptions")
        self.config, self.train, self.ranking_space = config, train, ranking_space
        self.item_ids = np.asarray(item_ids, dtype=np.int64)  # [I]: table row -> item id
        self.item_chats = [item_messages(text) for text in item_descriptions]
        self.splits = {"val": val[:config.val_size] if config.val_size else val,
                       "test": test[:config.test_size] if config.test_size else test}
        self.max_prompt_length, self.fingerprint = max_prompt_length, fingerprint
        self.scorer = ItemScorer(RecHeadConfig(config.similarity, config.temperature))
        self.model = self.tokenizer = self.table = None
        self.answer_id: int | None = None
        self.evaluation_table: tuple[tuple, torch.Tensor, float] | None = None  # (parameter versions, [I, H], s)
        self.reward_calls = 0  # RL steps seen: the refresh schedule's clock

    # --- the policy ---------------------------------------------------------
    def prepare_policy(self, model, tokenizer) -> None:
        """Add ``<answer>`` as one token (idempotent), resize the embeddings, check every prompt fits."""
        restore_saved_pre_tokenizer(tokenizer)
        if ANSWER not in tokenizer.get_vocab():
            tokenizer.add_tokens([ANSWER], special_tokens=True)
        inner = unwrap_model(model)
        if inner.get_input_embeddings().num_embeddings < len(tokenizer):
            inner.resize_token_embeddings(len(tokenizer))
        chats = [[{"role": "user", "content": r.prompt}] for r in self.train + self.splits["val"] + self.splits["test"]]
        texts = tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        if longest > self.max_prompt_length:
            raise ValueError(f"a prompt has {longest} tokens, more than trainer.max_prompt_length="
                             f"{self.max_prompt_length}, and the engine would cut its beginning; raise "
                             "trainer.max_prompt_length or lower task.history_window")

    def bind(self, model, tokenizer) -> None:
        """Keep the policy (it encodes items and users); start an empty item table for its hidden size and the
        refresh clock at 0 (a resumed run then loads both with `load_state_dict`)."""
        self.model, self.tokenizer, self.evaluation_table = model, tokenizer, None
        self.answer_id = tokenizer.convert_tokens_to_ids(ANSWER)
        if self.answer_id is None or self.answer_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {ANSWER} token; call prepare_policy(model, tokenizer) first")
        self.table = ItemTable(len(self.item_ids), unwrap_model(model).config.hidden_size)
        self.reward_calls = 0

    def stop_token_ids(self, tokenizer) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(ANSWER)]

    def _require_policy(self) -> None:
        if self.model is None:
            raise RuntimeError("the RecPO task is not bound to a policy: call bind(model, tokenizer) first")

    def encode_rows(self, rows, model=None, with_grad: bool = False) -> torch.Tensor:
        """h_v of the table rows `rows` [R] -> [R, H] (the policy's train/eval mode is left as it is)."""
        self._require_policy()
        return encode_items(model or self.model, self.tokenizer, [self.item_chats[int(r)] for r in rows],
                            batch_size=self.config.item_batch_size, with_grad=with_grad)

    def _encode_table(self) -> torch.Tensor:
        """The whole catalogue, [I, H], without gradient and in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.encode_rows(range(len(self.item_ids)))
        finally:
            self.model.train(was_training)

    def item_logprobs(self, model, user_hidden: torch.Tensor, target_column: torch.Tensor,
                      candidate_rows: torch.Tensor, encode: bool) -> torch.Tensor:
        """log pi(v+ | u) under the in-batch softmax over `candidate_rows` [P], [k] (paper Eq. 6).

        user_hidden [k, H]; target_column [k]: each row's target as a column of `candidate_rows`.
        `encode`: re-encode the candidates' item prompts with gradient (the learner's item term);
        else read their table rows (no gradient: pi_old, from the rows written at reward time).
        """
        if encode:
            item_hidden = self.encode_rows(candidate_rows.tolist(), model=model, with_grad=True)  # [P, H]
        else:
            item_hidden = self.table.hidden[candidate_rows.to(self.table.hidden.device)]  # [P, H]
        return self.scorer.in_batch_item_logprobs(user_hidden, item_hidden, target_column)

    # --- prompts ------------------------------------------------------------
    def num_train_prompts(self) -> int:
        return len(self.train)

    def train_messages(self, index: int) -> list[dict]:
        return [{"role": "user", "content": self.train[index].prompt}]

    def corpus(self) -> list[str]:
        """Text for a tiny model's tokenizer: training prompts, rationales and item prompts."""
        return ([r.prompt for r in self.train] + [r.rationale for r in self.train]
                + [chat[0]["content"] for chat in self.item_chats] + [ANSWER])

    def history_mask(self, requests: list[Request], device) -> torch.Tensor:
        """[B, I] bool: True for the items each request's user has seen (excluded from ranking)."""
        mask = torch.zeros(len(requests), len(self.item_ids), dtype=torch.bool, device=device)
        for row, request in enumerate(requests):
            if request.history_rows:
                mask[row, list(request.history_rows)] = True
        return mask

    # --- rewards ------------------------------------------------------------
    def rewards(self, prompt_indices: list[int], completions: list[str], rollout) -> Rewards:
        """R_d [B, 1] and the extras RecPO needs (module docstring); refreshes / overwrites the table first."""
        self._require_policy()
        step = self.reward_calls
        self.reward_calls += 1
        if self.table.due(step, self.config.refresh_every):
            self.table.refresh(self._encode_table, step)  # Algorithm 1, line 3
        requests = [self.train[i] for i in prompt_indices]
        device = rollout.completion_ids.device
        targets = torch.tensor([r.target_row for r in requests], dtype=torch.long, device=device)  # [B]
        fresh = targets.unique()  # [P]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.table.overwrite(fresh, self.encode_rows(fresh.tolist()))  # Algorithm 1, line 5
                lengths = rollout.completion_lengths  # [B]
                last = (lengths - 1).clamp(min=0)  # [B] column of each path's last token
                reached = (rollout.ended_with_eos.bool() & (lengths > 0)
                           & (rollout.completion_ids.gather(1, last[:, None]).squeeze(1) == self.answer_id))  # [B]
                user_hidden = completion_logprobs(
                    self.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                    rollout.completion_mask, temperature=rollout.temperature, hidden_positions=last,
                    logits_hook=rollout.logits_hook, prompt_indices=rollout.prompt_indices).hidden  # [B, H]
        finally:
            self.model.train(was_training)
        scores = self.scorer(user_hidden, self.table.hidden)  # [B, I]
        history = self.history_mask(requests, scores.device)  # [B, I]
        ranking = ndcg_reward(target_ranks(scores, targets, history), self.config.ndcg_k) * reached  # [B]
        probability = catalog_probability(scores, targets, history) * reached  # [B]
        return Rewards(ranking[:, None], torch.ones(len(requests), 1, dtype=torch.bool, device=device),
                       {"catalog_probability": probability, "target_item": targets, "reached_answer": reached,
                        "user_hidden": user_hidden.detach().float()})

    # --- stage 1 --------------------------------------------------------------
    def warm_start(self, model, tokenizer, config) -> list[dict]:
        """Stage 1 (module docstring), cached under what it depends on only (``STAGE1_FIELDS``, the model,
        SFT settings, lengths, seed, data, tokenizer), so RL variants share one checkpoint."""
        identity = {"sft": dataclasses.asdict(config.sft), "model": dataclasses.asdict(config.model),
                    "seed": config.seed, "max_prompt_length": config.trainer.max_prompt_length,
                    "max_new_tokens": config.sampling.max_new_tokens, "data": self.fingerprint,
                    "tokenizer": sorted(tokenizer.get_vocab().items()),
                    "task": {name: getattr(self.config, name) for name in STAGE1_FIELDS}}
        return cached_stage(model, "recpo-stage1", identity, lambda: self._warm_start(model, tokenizer, config))

    def _warm_start(self, model, tokenizer, config) -> list[dict]:
        self.bind(model, tokenizer)
        sft, device = config.sft, next(model.parameters()).device
        completions = [tokenizer(r.rationale, add_special_tokens=False)["input_ids"] + [self.answer_id]
                       for r in self.train]
        longest = max(len(ids) for ids in completions)
        if longest > config.sampling.max_new_tokens:
            raise ValueError(f"a stage-1 rationale has {longest} tokens with {ANSWER}, more than "
                             f"sampling.max_new_tokens={config.sampling.max_new_tokens}: raise it")
        optimizer = torch.optim.AdamW(model.parameters(), lr=sft.lr, betas=(0.9, 0.99), weight_decay=sft.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, "cosine", sft.warmup_steps, sft.steps))
        rng = np.random.default_rng(config.seed)
        order, position, history = rng.permutation(len(self.train)), 0, []
        started = time.perf_counter()
        model.train()
        progress = tqdm(total=sft.steps, desc="stage 1", dynamic_ncols=True)
        for step in range(sft.steps):
            if position + sft.batch_size > len(order):
                order, position = rng.permutation(len(self.train)), 0
            indices = order[position:position + sft.batch_size].tolist()
            position += sft.batch_size
            chats = [self.train_messages(i) for i in indices]
            prompt_ids, prompt_mask = encode_prompts(tokenizer, chats, config.trainer.max_prompt_length, device)
            completion_ids, completion_mask = pad_token_lists([completions[i] for i in indices],
                                                              tokenizer.pad_token_id, "right", device)  # [N, T]
            scores = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                         hidden_positions=completion_mask.sum(dim=1) - 1)
            lm_loss = -(scores.logprobs * completion_mask).sum() / completion_mask.sum()
            requests = [self.train[i] for i in indices]
            targets = torch.tensor([r.target_row for r in requests], device=device)  # [N]
            candidates, column = targets.unique(return_inverse=True)  # [P], [N]
            item_hidden = self.encode_rows(candidates.tolist(), model=model, with_grad=True)  # [P, H]
            direct_hidden = encode_items(model, tokenizer, chats, batch_size=len(chats), prefill_answer=ANSWER,
                                         with_grad=True)  # [N, H]: no reasoning
            if self.config.warm_start_softmax == "catalogue":
                if self.table.due(step, self.config.refresh_every):
                    self.table.refresh(self._encode_table, step)
                self.table.overwrite(candidates, item_hidden)
                seen = self.history_mask(requests, device)  # [N, I]
                reasoning_loss = -self.catalogue_logprobs(scores.hidden, item_hidden, candidates, targets, seen).mean()
                direct_loss = -self.catalogue_logprobs(direct_hidden, item_hidden, candidates, targets, seen).mean()
            else:
                reasoning_loss = -self.scorer.in_batch_item_logprobs(scores.hidden, item_hidden, column).mean()
                direct_loss = -self.scorer.in_batch_item_logprobs(direct_hidden, item_hidden, column).mean()
            loss = lm_loss + self.config.head_loss_weight * 0.5 * (reasoning_loss + direct_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sft.max_grad_norm)
            optimizer.step()
            scheduler.step()
            metrics = {"step": step + 1, "sft_loss": float(lm_loss.detach()),
                       "head_loss": float(reasoning_loss.detach()),
                       "head_only_loss": float(direct_loss.detach()), "grad_norm": float(grad_norm),
                       "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started}
            history.append(metrics)
            progress.update(1)
            progress.set_postfix(lm=f"{metrics['sft_loss']:.3f}", head=f"{metrics['head_loss']:.3f}",
                                 direct=f"{metrics['head_only_loss']:.3f}")
        progress.close()
        model.eval()
        return history

    def catalogue_logprobs(self, user_hidden: torch.Tensor, fresh_hidden: torch.Tensor, fresh_rows: torch.Tensor,
                           targets: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """log R_c with gradient: log softmax over the catalogue at each row's target, [N].

        user_hidden [N, H]; the table [I, H] scores every item, except the columns `fresh_rows` [P] (the batch's
        targets), scored from `fresh_hidden` [P, H] with gradient; history [N, I] bool: the user's seen items,
        left out (the target never is).
        """
        logits = self.scorer(user_hidden, self.table.hidden)  # [N, I], no gradient into the items
        logits = logits.index_copy(1, fresh_rows, self.scorer(user_hidden, fresh_hidden))  # [N, I]
        rows = torch.arange(targets.shape[0], device=targets.device)
        excluded = history.clone()
        excluded[rows, targets] = False
        logits = logits.masked_fill(excluded, float("-inf"))
        return logits[rows, targets] - torch.logsumexp(logits, dim=1)

    # --- evaluation -------------------------------------------------------------
    def user_outcomes(self, generate: Callable[..., list[str]], split: str) -> tuple[dict, dict, dict]:
        """Per-user metrics with reasoning and (if ``eval_head_only``) without, and run statistics.

        Returns ({metric: [N] array}, {metric: [N] array} or {}, {"table_refresh_s", "reasoning_tokens"}).
        """
        self._require_policy()
        requests = self.splits[split]
        chats = [[{"role": "user", "content": r.prompt}] for r in requests]
        item_hidden, seconds = self._evaluation_table()  # [I, H]
        statistics = {"table_refresh_s": seconds}
        texts = generate(chats)
        statistics["reasoning_tokens"] = float(np.mean([len(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                                                        for t in texts]))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                reasoning = encode_items(self.model, self.tokenizer, chats, self.config.item_batch_size,
                                         prefill_answer=[text + ANSWER for text in texts])  # [N, H]
                direct = (encode_items(self.model, self.tokenizer, chats, self.config.item_batch_size)
                          if self.config.eval_head_only else None)  # [N, H]
        finally:
            self.model.train(was_training)
        with_reasoning = self._ranking_metrics(reasoning, item_hidden, requests)
        head_only = self._ranking_metrics(direct, item_hidden, requests) if direct is not None else {}
        return with_reasoning, head_only, statistics

    def _evaluation_table(self) -> tuple[torch.Tensor, float]:
        """A fresh table of the current policy [I, H] (the paper re-encodes at every evaluation) and the seconds
        its encoding took, kept apart from the training table; reused while no parameter has changed (in-place
        updates bump a tensor's version)."""
        versions = tuple((id(p), p._version) for p in self.model.parameters())
        if self.evaluation_table is None or self.evaluation_table[0] != versions:
            started = time.perf_counter()
            table = self._encode_table()
            self.evaluation_table = (versions, table, time.perf_counter() - started)
        return self.evaluation_table[1], self.evaluation_table[2]

    def _ranking_metrics(self, user_hidden, item_hidden, requests: list[Request]) -> dict[str, np.ndarray]:
        """Rank the catalogue for each user and score the top list_length items as baselines_ml100k does."""
        scores = self.scorer(user_hidden, item_hidden).cpu().double().numpy()  # [N, I]
        by_column = np.full(int(self.item_ids.max()) + 1, -np.inf)  # [columns]: item id -> score
        per_user = []
        for request, row in zip(requests, scores):
            by_column[self.item_ids] = row
            items = items_from_scores(by_column, request.example.seen_item_ids, self.ranking_space,
                                      self.config.list_length)
            per_user.append(evaluate_list(items, request.example, self.ranking_space.catalog))
        return {key: np.array([metrics[key] for metrics in per_user]) for key in per_user[0]}

    def evaluate(self, generate: Callable[..., list[str]], split: str = "test") -> dict[str, float]:
        with_reasoning, head_only, statistics = self.user_outcomes(generate, split)
        result = {key: float(values.mean()) for key, values in with_reasoning.items()}
        result.update({f"head_only/{key}": float(values.mean()) for key, values in head_only.items()})
        return {**result, **statistics}

    # --- checkpoints ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"table": None if self.table is None else self.table.state_dict(), "reward_calls": self.reward_calls}

    def load_state_dict(self, state: dict) -> None:
        if state.get("table") is not None:
            if self.table is None:
                raise RuntimeError("bind(model, tokenizer) before loading the RecPO task's state (its item table)")
            self.table.load_state_dict(state["table"])
        self.reward_calls = state["reward_calls"]


# ----------------------------------------------------------------------------- building it from ML-100K


def build_recpo_task(config, data_dir: str | None) -> tuple[RecPOTask, list[str], str, str]:
    """(task, tokenizer corpus, data source, data fingerprint) for an experiment's config."""
    from experiments.data.cache import fingerprint_digests
    from experiments.data.item_graph import load_item_graph
    from experiments.data.movielens import build_conversations, load_movielens_ratings
    from experiments.data.next_item import next_item_requests

    settings = config.task
    ratings = load_movielens_ratings(data_dir, progress=False)
    conversations = build_conversations(ratings, list_length=settings.list_length, train_cuts_per_user=0)
    graph = load_item_graph(ratings)
    item_ids = sorted(conversations.recommendable_items)
    row_of = {item_id: row for row, item_id in enumerate(item_ids)}
    timelines = {timeline.user_id: timeline for timeline in conversations.timelines}

    def shown(user_id: int, cutoff: int) -> list[tuple[int, float]]:
        timeline = timelines[user_id]
        pairs = [(item, rating) for item, rating in zip(timeline.item_ids[:cutoff], timeline.ratings[:cutoff])
                 if item in row_of]
        return pairs[-settings.history_window:]

    def request(user_id: int, cutoff: int, seen: list[int], **fields) -> Request:
        history = shown(user_id, cutoff)
        prompt = user_prompt([(format_item(conversations.item_of(item)), rating) for item, rating in history])
        return Request(prompt, tuple(sorted({row_of[item] for item in seen if item in row_of})), **fields)

    train = [request(r.user_id, r.cutoff, list(r.seen_item_ids), target_row=row_of[r.target_item_id],
                     rationale=write_rationale(graph, shown(r.user_id, r.cutoff), r.target_item_id))
             for r in next_item_requests(conversations, "train", prefixes_per_user=settings.prefixes_per_user)]
    val, test = ([request(e.user_id, e.cutoff, e.seen_item_ids, example=e) for e in examples]
                 for examples in (conversations.val, conversations.test))
    knowledge_graph = {name: hashlib.sha256((Path(ratings.directory) / name).read_bytes()).hexdigest()
                       for name in ("ml-100k.kg", "ml-100k.link") if (Path(ratings.directory) / name).is_file()}
    fingerprint = fingerprint_digests({**ratings.file_digests, **knowledge_graph})
    task = RecPOTask(settings, item_ids, [graph.describe(item, settings.item_facts) for item in item_ids], train,
                     val, test, conversations, config.trainer.max_prompt_length, fingerprint)
    print(f"data: MovieLens-100K next item, {len(train)} training requests, {len(task.splits['val'])} val / "
          f"{len(task.splits['test'])} test users, {len(item_ids)} catalogue items")
    return task, task.corpus(), "movielens-100k", fingerprint


# ----------------------------------------------------------------------------- the results table


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a config.json tree."""
    flat = {}
    for key, value in tree.items():
        flat.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def run_record(run_dir: Path) -> dict:
    """What a run directory says about its training: the checkpoint chosen on validation, the validation
    history, the mean reward (R_d) and item loss per block of 10 steps, seconds per stage, the command."""
    selection = read_selection(run_dir)
    steps = read_metrics(run_dir / "metrics.jsonl")
    train = [row for row in steps if not row.get("eval") and row.get("reward_mean") is not None]

    def per_block(key: str) -> list[float]:
        return [round(float(np.mean([row.get(key, 0.0) for row in train[start:start + 10]])), 4)
                for start in range(0, len(train), 10)]

    return {"best_step": selection.get("best_step"), "val_ndcg@10_history": selection.get("history"),
            "reward_mean_per_10_steps": per_block("reward_mean"), "item_loss_per_10_steps": per_block("item_loss"),
            "rl_step_seconds": round(sum(row.get("time_rollout_s", 0) + row.get("time_reward_s", 0)
                                         + row.get("time_learn_s", 0) for row in train), 1),
            "command": json.loads((run_dir / "config.json").read_text()).get("command")}


def _checkpoint_of(path: Path) -> tuple[Path, Path | None]:
    """(model folder, run directory or None): a run directory's best checkpoint, or a save_pretrained folder."""
    if (path / "checkpoints" / "best").is_dir():
        return path / "checkpoints" / "best", path
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path, None
    raise SystemExit(f"error: {path} is neither a run directory with checkpoints/best nor a model folder")


def table(rows: list[tuple[str, Path]], reference_run: Path, data_dir: str | None, out: Path,
          reference: str, resamples: int = 10_000) -> dict:
    """Test metrics of each row (with reasoning, and its head alone as NAME/head_only) and paired bootstrap
    intervals of NDCG@10 and Recall@10 against the `reference` row."""
    from engine.trainer import completion_stop_ids, greedy_generate
    from experiments.config import apply, default_tree
    from fastdecode import fast_decoder
    from models.loader import load_model_and_tokenizer

    tree = json.loads((reference_run / "config.json").read_text())["config"]
    config = apply(default_tree(tree["name"], tree["kind"], tree["task_type"], tree["algorithm"], RecPOTaskConfig),
                   {key: value for key, value in _leaves(tree).items() if key not in ("name", "kind", "task_type")})
    task, _, _, _ = build_recpo_task(config, data_dir)
    results = {"seed": config.seed, "test_users": len(task.splits["test"]), "bootstrap_resamples": resamples,
               "reference": reference, "rows": {}}
    per_user = {}
    for name, path in rows:
        folder, run_dir = _checkpoint_of(path)
        model, tokenizer = load_model_and_tokenizer(str(folder), device=config.device)
        task.prepare_policy(model, tokenizer)
        task.bind(model, tokenizer)
        stop_ids = completion_stop_ids(task, tokenizer, model)
        generate = lambda chats, prompt_indices=None, logits_hook=None: greedy_generate(  # noqa: E731
            model, tokenizer, chats, config.sampling.max_new_tokens, config.trainer.max_prompt_length,
            config.trainer.eval_batch_size, stop_ids, fast_decoder)
        with_reasoning, head_only, statistics = task.user_outcomes(generate, "test")
        for row_name, outcomes in ((name, with_reasoning), (f"{name}/head_only", head_only)):
            row = {key: float(values.mean()) for key, values in outcomes.items()}
            row.update(checkpoint=str(folder), **statistics)
            if run_dir is not None:
                row.update(run_record(run_dir))
            results["rows"][row_name], per_user[row_name] = row, outcomes
    if reference not in per_user:
        raise SystemExit(f"error: the reference row {reference!r} is not among {sorted(per_user)}")
    for name, outcomes in per_user.items():
        if name != reference:
            for metric in ("ndcg@10", "recall@10"):
                results["rows"][name][f"{metric} - {reference} (95% CI)"] = interval_dict(
                    outcomes[metric], per_user[reference][metric], resamples)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("python -m experiments.recpo_task", table.__doc__)
    parser.add_argument("--reference", default="SFT", help="the row the intervals are taken against")
    args = parser.parse_args(argv)
    results = table(named_rows(args.rows), Path(args.reference_run), args.data_dir, Path(args.out), args.reference,
                    args.resamples)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
