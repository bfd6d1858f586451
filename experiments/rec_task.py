"""The conversational recommendation task: prompts, list rewards, and Recall/NDCG evaluation.

Rewards for a generated list (rewards/ does the parsing and matching):

    hits_k  = 1 if line k is a catalog item, not seen, matching an unused ground-truth item
    exp_inf   r_k = hits_k                                  (Rank-GRPO default)
    exp_gamma r_k = sum_{j >= k} hits_j / gamma^(j - k)
    log_decay r_k = sum_{j >= k} hits_j / log2(j + 1)       (causal DCG suffix)
    ndcg      R   = NDCG@N of the whole list                (one sequence reward, for GRPO / GSPO)

The first three give per-rank rewards [B, N] (rank_grpo); `ndcg` gives [B].
Evaluation decodes greedily on the validation split (NDCG@10 chooses the reported
checkpoint) or the test split and averages Recall@K / NDCG@K.

The list length N is the data source's own (Reddit-v2 prompts ask for 20 items, the
MovieLens requests for 10 unless `task.list_length` says otherwise). SFT demonstrations
on MovieLens are an EASE teacher's lists (experiments/baselines.py; docs/rank_grpo.md §7),
for a request at every usable prefix of each training history with `train_cut_points=none`.

Item tokens and constrained decoding (both off by default). `item_tokens` adds every
catalog item "Title (Year)" to the tokenizer as one token (`add_item_tokens`), so a list of
N items is 2N tokens (item, newline; the last item is followed by EOS) instead of ~7N BPE
pieces; texts, parsing and rewards are unchanged. `decode_constraint` then masks item tokens
while sampling, in the log-prob recompute and in evaluation (`ItemConstraint`): `no_repeat`
never names an item twice in a list, `unseen` also never names an item of the request's
`seen` history (the MovieLens prompt shows only the 10 most recent liked movies, while the
evaluation and the classical baselines remove every seen item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from engine.config import check, check_choice
from experiments.data import RecData
from models.semantic_ids import add_vocabulary_tokens
from rewards.catalog import rank_hits
from rewards.lists import format_item, parse_list
from rewards.ranking import evaluate_list, mean_metrics, rank_rewards, sequence_ndcg

PER_RANK_REWARDS = ("exp_inf", "exp_gamma", "log_decay")
REWARD_KINDS = PER_RANK_REWARDS + ("ndcg",)
SOURCES = ("auto", "reddit-v2", "movielens-100k")
DECODE_CONSTRAINTS = ("none", "no_repeat", "unseen")


@dataclass
class RecTaskConfig:
    source: str = "auto"  # auto: Reddit-v2 when its conversations are in the data dir, else MovieLens-100K
    list_length: int | None = None  # N; None = the data source's own (Reddit-v2: 20, MovieLens: 10)
    reward_kind: str = "exp_inf"
    reward_gamma: float = 2.0  # Gamma of exp_gamma
    eval_size: int = 0  # evaluate on the first eval_size requests of the val and test splits; 0 = all
    train_cut_points: int | None = 3  # MovieLens training requests per user; None = every usable prefix
    item_tokens: bool = False  # one vocabulary token per catalog item "Title (Year)" (see add_item_tokens)
    decode_constraint: str = "none"  # none | no_repeat | unseen (ItemConstraint; needs item_tokens)

    reward_setting: ClassVar[str | None] = "task.reward_kind"  # the key that changes reward_shape()

    def reward_shape(self) -> str:
        """The kind of reward this task gives (a key of algorithms.base.REWARD_SHAPES)."""
        return "sequence" if self.reward_kind == "ndcg" else "ranks"  # NDCG@N of the list, or one per rank

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check(self.list_length is None or self.list_length >= 2, "list_length", self.list_length,
              "must be >= 2 (or none for the data source's own)")
        check_choice("reward_kind", self.reward_kind, REWARD_KINDS)
        check(self.reward_gamma > 1, "reward_gamma", self.reward_gamma, "must be > 1")
        check(self.eval_size >= 0, "eval_size", self.eval_size, "must be >= 0 (0 = the whole test split)")
        check(self.train_cut_points is None or self.train_cut_points >= 1, "train_cut_points", self.train_cut_points,
              "must be >= 1 (or none for every usable prefix)")
        check_choice("decode_constraint", self.decode_constraint, DECODE_CONSTRAINTS)
        check(self.decode_constraint == "none" or self.item_tokens, "decode_constraint", self.decode_constraint,
              "masks item tokens, so it needs task.item_tokens=true (or set task.decode_constraint=none)")


class RecommendationTask:
    selection_metric = "ndcg@10"

    def __init__(self, data: RecData, list_length: int, reward_kind: str, reward_gamma: float = 2.0,
                 eval_size: int = 0, item_tokens: bool = False, decode_constraint: str = "none"):
        check_choice("reward_kind", reward_kind, REWARD_KINDS)
        check_choice("decode_constraint", decode_constraint, DECODE_CONSTRAINTS)
        if decode_constraint != "none" and not item_tokens:
            raise ValueError(f"decode_constraint={decode_constraint!r} masks item tokens: it needs item_tokens=True")
        if not data.train:
            raise ValueError(f"the {data.source} training split is empty")
        self.data = data
        self.list_length = list_length
        self.reward_kind = reward_kind
        self.reward_gamma = reward_gamma
        self.item_tokens = item_tokens
        self.decode_constraint = decode_constraint
        self.logits_hook = None  # the training rollouts' ItemConstraint, set by prepare_policy
        self.constraints: dict[str, ItemConstraint] = {}  # evaluation split -> its ItemConstraint
        # Fixed, deterministic evaluation subsets: the first `eval_size` examples of each split.
        self.splits = {"val": data.val[:eval_size] if eval_size else data.val,
                       "test": data.test[:eval_size] if eval_size else data.test}

    # --- the policy -----------------------------------------------------
    def prepare_policy(self, model, tokenizer) -> None:
        """With `item_tokens`, give every catalog item its own token (idempotent: a checkpoint that has them
        is left as it is)."""
        if not self.item_tokens:
            return
        items = list(self.data.catalog)
        add_item_tokens(tokenizer, model, [format_item(item) for item in items])
        if self.decode_constraint != "none":
            token_of = dict(zip(items, tokenizer.convert_tokens_to_ids([format_item(item) for item in items])))
            vocabulary_size = model.get_output_embeddings().weight.shape[0]
            make = lambda examples: ItemConstraint(examples, token_of, vocabulary_size,
                                                   self.decode_constraint == "unseen")
            self.logits_hook = make(self.data.train)
            self.constraints = {split: make(examples) for split, examples in self.splits.items()}

    # --- training prompts and rewards ------------------------------------
    def num_train_prompts(self) -> int:
        return len(self.data.train)

    def train_messages(self, index: int) -> list[dict]:
        return self.data.train[index].messages

    def hits(self, example, completion: str) -> list[int]:
        return rank_hits(parse_list(completion), example.groundtruth, example.seen, self.data.catalog,
                         self.list_length)

    def rewards(self, prompt_indices: list[int], completions: list[str], rollout=None) -> torch.Tensor:
        examples = [self.data.train[i] for i in prompt_indices]
        hits = np.array([self.hits(example, text) for example, text in zip(examples, completions)])  # [B, N]
        if self.reward_kind == "ndcg":
            return torch.tensor([sequence_ndcg(row, num_relevant=len(example.groundtruth))
                                 for row, example in zip(hits, examples)], dtype=torch.float32)  # [B]
        gamma = self.reward_gamma if self.reward_kind == "exp_gamma" else None
        return torch.tensor(rank_rewards(hits, self.reward_kind, gamma), dtype=torch.float32)  # [B, N]

    # --- supervised warm start ------------------------------------------
    def demonstrations(self) -> tuple[list[list[dict]], list[str]]:
        examples = [e for e in self.data.train if e.demonstration]
        if not examples:
            raise ValueError(f"the {self.data.source} training split has no demonstrations for SFT")
        return [e.messages for e in examples], [e.demonstration for e in examples]

    def corpus(self) -> list[str]:
        """Text for the tokenizer: prompts, demonstrations and every catalog title."""
        texts = [message["content"] for e in self.data.train for message in e.messages]
        texts += [e.demonstration for e in self.data.train if e.demonstration]
        texts += [format_item(item) for item in self.data.catalog]
        return texts

    # --- evaluation -------------------------------------------------------
    def example_metrics(self, generate: Callable[..., list[str]], split: str = "test") -> tuple[list[dict], list[str]]:
        """(Recall@K / NDCG@K of each example of the split, in split order; the greedy completions)."""
        examples = self.splits[split]
        if split in self.constraints:
            completions = generate([e.messages for e in examples], prompt_indices=list(range(len(examples))),
                                   logits_hook=self.constraints[split])
        else:
            completions = generate([e.messages for e in examples])
        return [evaluate_list(text, e, self.data.catalog) for text, e in zip(completions, examples)], completions

    def evaluate(self, generate: Callable[..., list[str]], split: str = "test") -> dict[str, float]:
        metrics, completions = self.example_metrics(generate, split)
        result = mean_metrics(metrics)
        result["in_catalog_frac"] = float(np.mean([
            np.mean([line.item is not None and line.item in self.data.catalog for line in parse_list(text)] or [0.0])
            for text in completions
        ]))
        return result


class ItemConstraint:
    """Constrained decoding over item tokens (engine.logprobs.LogitsHook): at completion position p,
    an item token is masked (logit -inf) when

        no_repeat:  it occurs among the completion's tokens before p (a list never names an item twice)
        unseen:     also when the request's `seen` items hold it (the user's history: what the
                    classical baselines remove from their lists as well, experiments/baselines.py)

    Other tokens (newline, EOS, BPE pieces) are never masked. The sampler and the log-prob
    recompute call it alike, so the policy, the old and the reference log-probs are all those of
    the constrained distribution.
    """

    def __init__(self, examples, token_of: dict, vocabulary_size: int, unseen: bool):
        self.examples, self.token_of, self.unseen = examples, token_of, unseen
        self.is_item = torch.zeros(vocabulary_size, dtype=torch.bool)  # [V]
        self.is_item[list(token_of.values())] = True
        self.seen_tokens: dict[int, list[int]] = {}  # prompt index -> token ids of its seen items

    def _seen(self, index: int) -> list[int]:
        if index not in self.seen_tokens:
            self.seen_tokens[index] = [self.token_of[item] for item in self.examples[index].seen
                                       if item in self.token_of]
        return self.seen_tokens[index]

    def __call__(self, logits, prompt_indices, completion_ids, start: int):
        rows, chunk, vocabulary = logits.shape  # [N, C, V]
        device = logits.device
        positions = start + torch.arange(chunk, device=device)  # [C] absolute completion positions
        earlier = completion_ids[:, : start + chunk - 1]  # [N, Q] tokens some position of the chunk follows
        first = torch.full((rows, vocabulary), completion_ids.shape[1] + chunk, dtype=torch.long, device=device)
        if earlier.shape[1]:
            columns = torch.arange(earlier.shape[1], device=device).expand_as(earlier)  # [N, Q]
            first.scatter_reduce_(1, earlier, columns, reduce="amin")  # [N, V] first position of each token
        banned = first[:, None, :] < positions[None, :, None]  # [N, C, V]: emitted before this position
        if self.unseen:
            if bool((prompt_indices < 0).any()):
                raise ValueError("ItemConstraint(unseen) needs each row's prompt index (the sampler got none: pass "
                                 "prompt_indices), since the seen items differ per request")
            seen = [self._seen(int(index)) for index in prompt_indices.tolist()]
            row_ids = torch.tensor([row for row, tokens in enumerate(seen) for _ in tokens], dtype=torch.long)
            seen_mask = torch.zeros(rows, vocabulary, dtype=torch.bool)  # [N, V]
            seen_mask[row_ids, torch.tensor([t for tokens in seen for t in tokens], dtype=torch.long)] = True
            banned = banned | seen_mask.to(device)[:, None, :]
        banned = banned & self.is_item.to(device)[None, None, :]  # [N, C, V]
        return logits.masked_fill(banned, float("-inf"))


def add_item_tokens(tokenizer, model, titles: list[str]) -> int:
    """Add each "Title (Year)" in `titles` to `tokenizer` as one token; grow `model`'s embeddings to match.

    The tokens are ordinary (non-special) added tokens: the tokenizer matches them whole in
    the text before BPE (leftmost-longest), and decoding writes the title back, so prompts,
    completions, list parsing and rewards are unchanged; only the number of tokens per item
    falls (from ~5-7 BPE tokens to 1, plus its newline). New embedding rows get the model's
    own initialisation (models/semantic_ids.py ``add_vocabulary_tokens`` with
    ``noise_scale=None``). Returns the number of tokens added.
    """
    before = len(tokenizer)
    add_vocabulary_tokens(tokenizer, model, titles, noise_scale=None)
    return len(tokenizer) - before


def build_recommendation_task(config, data_dir: str | None) -> tuple[RecommendationTask, list[str], str, str]:
    """(task, tokenizer corpus, data source, data fingerprint) for an experiment's config.

    Loads Reddit-v2 or MovieLens-100K (experiments.data); MovieLens training and validation
    requests get EASE-teacher demonstrations for the SFT warm start.
    """
    from experiments.baselines import attach_demonstrations, fit_teacher
    from experiments.data import DataError, load_recommendation_data

    settings = config.task
    data = load_recommendation_data(data_dir, list_length=settings.list_length or 10, source=settings.source,
                                    verbose=False, train_cuts_per_user=settings.train_cut_points)
    if settings.list_length is not None and settings.list_length != data.list_length:
        raise DataError(f"task.list_length={settings.list_length}: the {data.source} prompts ask for "
                        f"{data.list_length} items; leave task.list_length unset (none) to use the data's own")
    if data.movielens is not None:
        teacher = fit_teacher(data.movielens, part="train")
        attach_demonstrations(data.train, teacher, data.movielens)
        attach_demonstrations(data.val, teacher, data.movielens)
        print(f"data: Reddit-v2 not found in the data dir; using the MovieLens-100K conversational set instead "
              f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test requests)")
    else:
        print(f"data: Reddit-v2 conversations ({len(data.train)} train / {len(data.val)} val / {len(data.test)} test)")
    task = RecommendationTask(data, data.list_length, settings.reward_kind, settings.reward_gamma, settings.eval_size,
                              settings.item_tokens, settings.decode_constraint)
    return task, task.corpus(), data.source, data.fingerprint
