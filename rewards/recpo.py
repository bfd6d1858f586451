"""RecPO rewards and advantages (R²ec, You et al., arXiv 2505.16994, §3.2; docs/recpo.md).

R²ec scores every catalogue item v for a reasoning path that ended in ``<answer>``:
s(v) = sim(h_T, h_v) / tau (models/rec_head.py). From the scores [B, I] of one
path per row, the target v+ of the row, and the row's history (items the user
already consumed, which cannot be recommended again):

* candidates C = all items except the history; the target is always a candidate,
  even when it also appears in the history.
* rank(v+) = 1 + |{v in C, v != v+ : s(v) >= s(v+)}|                 (1-based)
  Ties are *pessimistic*: an item scoring exactly as high as the target is ranked
  above it. A degenerate head that gives every item the same score therefore earns
  the worst rank, never the best (an optimistic or index-ordered rule would pay a
  collapsed head for nothing).
* ranking reward (NDCG@k with one relevant item, so IDCG = 1):
      R_d = 1 / log2(rank + 1)   if rank <= k,   0 otherwise
* catalogue reward (softmax over the candidates; the full catalogue, not the batch):
      R_c = exp(s(v+)) / sum_{v in C} exp(s(v))
* fused reward (paper Eq. 5; beta = 0.05 and k = 1000 in the official code):
      R = beta R_c + (1 - beta) R_d

Advantages of the G paths of one user (rows with the same group id):

* GRPO, the paper's default: (R_i - mean_g R) / (std_g R + eps) with the unbiased
  std; that is ``engine.loss.group_advantages`` (the official code uses eps = 1e-8).
* leave-one-out (RLOO): the baseline of path i is the mean reward of the other G - 1
  paths, A_i = R_i - mean_{j != i} R_j; ``group_advantages(..., scale="leave_one_out")``.

The advantages and the best-path choice (which paths train the item head) belong to
the strategy, ``algorithms/recpo.py``.

Rewards are numbers, not losses: every function here detaches its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


DEFAULT_BETA = 0.05
DEFAULT_NDCG_K = 1000


def _check_scores(scores: Tensor, targets: Tensor, history_mask: Tensor | None) -> Tensor:
    """Validate the inputs; return the candidate mask [B, I] bool (history removed, target kept)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, I] (rows x catalogue items), got shape {tuple(scores.shape)}")
    num_rows, num_items = scores.shape
    if targets.shape != (num_rows,):
        raise ValueError(f"targets must be [B] = [{num_rows}] item indices, got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must hold integer item indices, got dtype {targets.dtype}")
    if num_rows and (int(targets.min()) < 0 or int(targets.max()) >= num_items):
        raise ValueError(f"target indices must lie in [0, {num_items}); got min {int(targets.min())}, "
                         f"max {int(targets.max())}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; exclude history items with history_mask, not with -inf scores")
    if history_mask is None:
        excluded = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # [B, I]
    else:
        if history_mask.shape != scores.shape:
            raise ValueError(f"history_mask {tuple(history_mask.shape)} must have the shape of scores "
                             f"{tuple(scores.shape)}")
        if history_mask.dtype != torch.bool:
            raise ValueError(f"history_mask must be bool (True = exclude the item), got dtype {history_mask.dtype}")
        excluded = history_mask.clone()  # [B, I]
    rows = torch.arange(num_rows, device=scores.device)
    excluded[rows, targets.long()] = False  # the target is never excluded
    return ~excluded  # [B, I]


def target_ranks(scores: Tensor, targets: Tensor, history_mask: Tensor | None = None) -> Tensor:
    """1-based rank of each row's target among its candidate items, [B] long (pessimistic ties).

    scores [B, I] over the whole catalogue; targets [B] item indices; history_mask
    [B, I] bool, True for items to exclude (the target itself never is); None
    excludes nothing.
    """
    candidates = _check_scores(scores, targets, history_mask)  # [B, I]
    scores = scores.detach()
    targets = targets.long()
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    rows = torch.arange(scores.shape[0], device=scores.device)
    competitors = candidates.clone()
    competitors[rows, targets] = False  # [B, I]: every candidate but the target
    at_least_as_high = (scores >= target_scores) & competitors  # [B, I]
    return 1 + at_least_as_high.sum(dim=1)  # [B]


def ndcg_reward(ranks: Tensor, k: int = DEFAULT_NDCG_K) -> Tensor:
    """R_d = 1 / log2(rank + 1) for rank <= k, else 0; ranks [B] (1-based) -> [B] float32."""
    if k < 1:
        raise ValueError(f"NDCG cut-off k must be >= 1, got {k}")
    if ranks.numel() and int(ranks.min()) < 1:
        raise ValueError(f"ranks are 1-based; got a rank of {int(ranks.min())}")
    ranks = ranks.detach().double()
    gains = 1.0 / torch.log2(ranks + 1.0)  # [B]
    return torch.where(ranks <= k, gains, torch.zeros_like(gains)).float()


def catalog_probability(scores: Tensor, targets: Tensor, history_mask: Tensor | None = None) -> Tensor:
    """R_c = softmax of the scores over each row's candidate items, taken at the target; [B] float32."""
    candidates = _check_scores(scores, targets, history_mask)  # [B, I]
    logits = scores.detach().double().masked_fill(~candidates, float("-inf"))  # [B, I]
    target_logits = logits.gather(1, targets.long()[:, None]).squeeze(1)  # [B]
    return torch.exp(target_logits - torch.logsumexp(logits, dim=1)).float()


def recpo_reward(
    scores: Tensor,
    targets: Tensor,
    history_mask: Tensor | None = None,
    beta: float = DEFAULT_BETA,
    k: int = DEFAULT_NDCG_K,
) -> Tensor:
    """R = beta R_c + (1 - beta) R_d per row, [B] float32 (module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta weighs R_c against R_d and must lie in [0, 1], got {beta}")
    ranking = ndcg_reward(target_ranks(scores, targets, history_mask), k)  # [B]
    probability = catalog_probability(scores, targets, history_mask)  # [B]
    return beta * probability + (1.0 - beta) * ranking
