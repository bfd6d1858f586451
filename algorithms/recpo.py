"""RecPO: reasoning tokens for every path, the item head for the best path only.

You, Yang et al. 2025, "R²ec: Towards Large Recommender Models with Reasoning", arXiv
2505.16994 (NeurIPS 2025), §3; official code github.com/YRYangang/RRec; recrl's summary:
docs/recpo.md.

Model (§3.1). One decoder writes a reasoning path o = o_1..o_T for the user prompt x_u and
ends it with the token ``<answer>``; the last-layer hidden state there is the user vector
h_T. The same decoder embeds every item v from an item prompt (h_v), and the recommendation
head scores s(u, v) = sim(h_T, h_v) / tau. The task owns that head and the item table
(experiments/recpo_task.py, models/rec_head.py); this file only assigns the credit.

Trajectory (§3.2). A rollout is (x_u, o_1..o_T, v+): T token actions of the language head,
then ONE item action of the recommendation head whose action is the user's target item v+
(teacher forced). G paths are sampled per user prompt.

1. Reward (Eq. 5). From the scores of path i over the whole catalogue (the user's history
   removed), the task reports the NDCG reward of the target's rank and its catalogue
   probability; this file fuses them:

       R_d = 1 / log2(rank(v+) + 1)  if rank <= k, else 0
       R_c = exp s(v+) / sum_v exp s(v)
       R_i = beta R_c + (1 - beta) R_d                          (beta = 0.05)

   A path that never wrote ``<answer>`` (the token budget ran out) has no h_T: R_d = R_c = 0,
   the lowest reward, and no item term. ``reward_beta`` = 0 / 1 are the paper's ablations
   "w/o R_c" / "w/o R_d".

2. Advantage (§3.2.3). Group-relative per path, the unbiased std of the group (eps 1e-8 in
   the code), or leave-one-out (``strategy.advantage_scale = leave_one_out``):

       A_i = (R_i - mean_g R) / (std_g R + eps)        or        A_i = R_i - mean_{j != i} R_j

   Each path is weighted by its OWN advantage. (The official trainer unsqueezes the
   advantages once too often, broadcasts them to (mb, mb, L) and weights every row by the
   mini-batch mean advantage, ~0 for the G paths of one user; docs/recpo.md §5.)

3. Importance ratios of the two stages (Eq. 6):

       token t <= T:   r_{i,t}   = pi_theta(o_{i,t} | x_u, o_{i,<t}) / pi_old(...)
       item:           r_{i,T+1} = pi_theta(v+ | x_u, o_i) / pi_old(v+ | x_u, o_i)

   The item policy is a softmax over the target items of the batch (not the catalogue):
   pi_theta(v+ | x_u, o_i) = exp s(u, v+) / sum_{v' in batch targets} exp s(u, v'), with the
   targets' item prompts re-encoded WITH gradient, so the item term trains both h_T and h_v.

4. Objective (Eq. 8), maximised; i* = argmax_i A_i (ties: the earlier path):

       J = E[ (1/G) sum_i ( (1/|o_i|) sum_t min(r_{i,t} A_i, clip(r_{i,t}, 1-eps_l, 1+eps_h) A_i)
                            + 1[i = i*] min(r_{i,T+1} A_i, clip(r_{i,T+1}, 1-eps_l, 1+eps_h) A_i) ) ]

   Every path trains the language head; only the best path trains the recommendation head
   (``relabel_topk`` paths per group; 1 is the paper's i*, the launch script uses 2). The
   token term is the engine's clipped loss with ``seq_mean_token_mean`` aggregation; the
   item term is added here, summed over the best paths and divided by the step's rows (the
   learner's division), i.e. the same 1/(G P) average. No KL, no reference model; clip
   0.2 / 0.28 as in the code (one update per rollout: every ratio is 1 and the clip never
   acts).

pi_old of the item action is computed once per update (``begin_update``) from the h_T the
task kept at reward time and the table rows it overwrote then with the targets' fresh
embeddings (Algorithm 1, line 5), i.e. from the policy that sampled the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.base import Strategy, StrategyConfig, token_unit_ids
from engine.config import check
from engine.learner import Rewards
from engine.loss import clipped_surrogate, group_advantages
from engine.rollout import Rollout

REQUIRED_EXTRAS = ("catalog_probability", "target_item", "reached_answer", "user_hidden")


@dataclass
class RecPOConfig(StrategyConfig):
    advantage_eps: float = 1e-8  # the official code's eps on the group std
    reward_beta: float = 0.05  # beta of R = beta R_c + (1 - beta) R_d (Eq. 5); 0 = "w/o R_c", 1 = "w/o R_d"
    relabel_topk: int = 1  # best paths per group that train the item head (paper: 1; launch script: 2)
    item_clip_ratio_low: float = 0.2  # clip range of the item ratio r_{i,T+1} (the code's, as for tokens)
    item_clip_ratio_high: float = 0.28

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.reward_beta <= 1.0, "reward_beta", self.reward_beta, "must lie in [0, 1]")
        check(self.relabel_topk >= 1, "relabel_topk", self.relabel_topk, "must be >= 1 (1 = the paper's best path)")
        check(0 <= self.item_clip_ratio_low < 1, "item_clip_ratio_low", self.item_clip_ratio_low, "must be in [0, 1)")
        check(self.item_clip_ratio_high >= 0, "item_clip_ratio_high", self.item_clip_ratio_high, "must be >= 0")


def best_path_mask(advantages: Tensor, group_ids: Tensor, top_k: int = 1) -> Tensor:
    """True for the `top_k` highest-advantage rows of each group, [B] bool; ties go to the earlier row.

    advantages [B]; group_ids [B]. A group with at most top_k rows is kept whole.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (1 = the paper's best path), got {top_k}")
    if advantages.dim() != 1 or group_ids.shape != advantages.shape:
        raise ValueError(f"advantages and group_ids must both be [B]; got {tuple(advantages.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if torch.isnan(advantages).any():
        raise ValueError("advantages contain NaN; fix the rewards before selecting the best paths")
    advantages = advantages.detach()
    rows = torch.arange(advantages.shape[0], device=advantages.device)
    same_group = group_ids[:, None] == group_ids[None, :]  # [B, B]: row i, other row j
    higher = advantages[None, :] > advantages[:, None]  # [B, B]: A_j > A_i
    tied_earlier = (advantages[None, :] == advantages[:, None]) & (rows[None, :] < rows[:, None])  # [B, B]
    rows_ahead = (same_group & (higher | tied_earlier)).sum(dim=1)  # [B]: rows of the group ranked before i
    return rows_ahead < top_k


class RecPO(Strategy):
    """Token credit for every reasoning path; the item term for the best path of each group."""

    name = "recpo"
    Config = RecPOConfig
    reward_shapes = ("item_head",)
    extra_loss_name = "item_loss"
    defaults = {"learner.clip_ratio_low": 0.2, "learner.clip_ratio_high": 0.28,
                "learner.loss_agg_mode": "seq_mean_token_mean", "learner.kl_coef": 0.0}

    def __init__(self, config: RecPOConfig | None = None, tokenizer=None, task=None):
        super().__init__(config, tokenizer, task)
        if task is not None and not callable(getattr(task, "item_logprobs", None)):
            raise ValueError(f"recpo needs a task with an item head (item_logprobs), e.g. the recpo task of "
                             f"experiments/recpo_task.py; {type(task).__name__} has none")
        self.item_batch: dict[str, Tensor] | None = None  # the item action of the current update

    # --- 1. the reward (Eq. 5) ----------------------------------------------
    def shape_rewards(self, rewards: Rewards, rollout: Rollout) -> Rewards:
        missing = [key for key in REQUIRED_EXTRAS if key not in rewards.extras]
        if rewards.values.shape[1] != 1 or missing:
            raise ValueError(f"recpo needs one ranking reward R_d per path ([B, 1]) and the extras "
                             f"{', '.join(REQUIRED_EXTRAS)} from its task; got shape {tuple(rewards.values.shape)}"
                             f"{', missing ' + ', '.join(missing) if missing else ''}")
        beta = self.config.reward_beta
        fused = beta * rewards.extras["catalog_probability"] + (1.0 - beta) * rewards.values[:, 0]  # [B]
        return Rewards(fused[:, None], rewards.mask, rewards.extras)

    # --- 2. token credit with each path's own advantage -------------------------
    def path_advantages(self, rewards: Rewards, group_ids: Tensor) -> Tensor:
        """A_i per path, [B] (group-normalised or leave-one-out)."""
        return group_advantages(rewards.values[:, 0], group_ids, self.config.advantage_scale,
                                self.config.advantage_eps)

    def unit_ids(self, rollout: Rollout, rewards) -> Tensor:
        return token_unit_ids(rollout.completion_mask)  # [B, T]: every token its own ratio

    def advantages(self, rewards, rollout: Rollout, unit_ids: Tensor) -> Tensor:
        return self.path_advantages(rewards, rollout.group_ids)[:, None] * rollout.completion_mask  # [B, T]

    # --- 3. the item action of the best path(s) -------------------------------
    def hidden_positions(self, batch) -> Tensor:
        return (batch.rollout.completion_lengths - 1).clamp(min=0)  # [B]: the <answer> token of a finished path

    def begin_update(self, model, batch) -> None:
        """Choose the paths that train the head, their candidates and pi_old of their item action."""
        extras = batch.rewards.extras
        advantages = self.path_advantages(batch.rewards, batch.rollout.group_ids)  # [B]
        trains_head = best_path_mask(advantages, batch.rollout.group_ids, self.config.relabel_topk)  # [B]
        trains_head &= extras["reached_answer"].bool()  # no <answer>, no h_T, no item action
        candidates, target_column = extras["target_item"].long().unique(return_inverse=True)  # [P], [B]
        with torch.no_grad():
            old_logprobs = self.task.item_logprobs(model, extras["user_hidden"], target_column, candidates,
                                                   encode=False)  # [B]
        self.item_batch = {"advantages": advantages, "trains_head": trains_head, "candidates": candidates,
                           "target_column": target_column, "old_logprobs": old_logprobs}

    def extra_loss(self, model, batch, rows: Tensor, hidden: Tensor | None) -> Tensor | None:
        """-sum over the best paths in `rows` of min(r A, clip(r) A), r = the item ratio (Eq. 8)."""
        item = self.item_batch
        selected = item["trains_head"][rows]  # [b] bool
        if not bool(selected.any()):
            return None
        logprobs = self.task.item_logprobs(model, hidden[selected], item["target_column"][rows][selected],
                                           item["candidates"], encode=True)  # [k], grad through h_T and h_v
        log_ratio = logprobs - item["old_logprobs"][rows][selected]  # [k]
        loss, _ = clipped_surrogate(log_ratio, item["advantages"][rows][selected], self.config.item_clip_ratio_low,
                                    self.config.item_clip_ratio_high)  # [k]
        return loss.sum()
