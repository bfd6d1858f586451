"""The RL loop: prompts -> rollout -> rewards -> strategy -> learner -> log / eval / checkpoint.

One step:

    1. take the next `prompts_per_step` prompts from the data cursor
    2. rollout  = sample G completions per prompt (engine.rollout)          time_rollout_s
    3. rewards  = task.rewards(...), then strategy.shape_rewards(...)      time_reward_s
       dynamic sampling (if the strategy keeps only some groups): sample more
       prompts until the batch is full, at most `max_generation_rounds` rounds
    4. unit_ids, advantages = the strategy's credit assignment
    5. learner.update(...)                                                   time_learn_s
    6. metrics.jsonl / tensorboard / tqdm; eval every `eval_every`; checkpoint every `save_every`

The engine knows nothing about recommendation: a `Task` provides prompts, rewards
and an evaluation. Prompts are drawn without replacement in a fresh seeded
permutation per epoch; the only state is the number of prompts consumed (the
cursor), so a resumed run draws exactly the prompts the uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engine.learner import Learner, PolicyBatch
from engine.logging import RunLogger
from engine.rollout import Rollout, SamplingConfig, sample


class Task(Protocol):
    """A verifiable task: chat prompts, a reward function, and an evaluation."""

    def num_train_prompts(self) -> int: ...

    def train_messages(self, index: int) -> list[dict]: ...

    def rewards(self, prompt_indices: list[int], completions: list[str]) -> Tensor:
        """[B] (one reward per completion) or [B, N] (per rank); NaN marks a broken reward."""
        ...

    def evaluate(self, generate: Callable[[list[list[dict]]], list[str]]) -> dict[str, float]:
        """Metrics of greedy completions on held-out prompts; `generate` maps chats to texts."""
        ...


@dataclass
class TrainerConfig:
    seed: int = 0
    max_steps: int = 100
    prompts_per_step: int = 4
    group_size: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    save_every: int = 0  # 0 = only at the end
    eval_every: int = 0  # 0 = only before and after training
    max_generation_rounds: int = 1  # dynamic sampling: rollouts per step at most
    eval_batch_size: int = 32
    log_samples_every: int = 10
    keep_checkpoints: int | None = 2


class PromptCursor:
    """Endless stream of prompt indices: a seeded permutation per epoch, resumable from a count."""

    def __init__(self, num_prompts: int, seed: int, consumed: int = 0):
        if num_prompts < 1:
            raise ValueError("the task has no training prompts")
        self.num_prompts = num_prompts
        self.seed = seed
        self.consumed = consumed
        self._epoch, self._order = -1, None

    def take(self, count: int) -> list[int]:
        indices = []
        for _ in range(count):
            epoch, offset = divmod(self.consumed, self.num_prompts)
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
            indices.append(int(self._order[offset]))
            self.consumed += 1
        return indices


def encode_prompts(tokenizer, chats: list[list[dict]], max_length: int, device) -> tuple[Tensor, Tensor]:
    """Chat-template and left-pad prompts: ids [P, S], mask [P, S] bool. Long prompts keep their end."""
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:] for text in texts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encoded to zero tokens; check the task's messages")
    return pad_token_lists(encoded, tokenizer.pad_token_id, "left", device)


def pad_token_lists(sequences: list[list[int]], pad_id: int, side: str, device) -> tuple[Tensor, Tensor]:
    """Pad token-id lists to one length on the `side` ("left" | "right"): ids [N, L], mask [N, L] bool."""
    length = max(len(sequence) for sequence in sequences)
    ids, mask = [], []
    for sequence in sequences:
        padding = length - len(sequence)
        if side == "left":
            ids.append([pad_id] * padding + sequence)
            mask.append([False] * padding + [True] * len(sequence))
        else:
            ids.append(sequence + [pad_id] * padding)
            mask.append([True] * len(sequence) + [False] * padding)
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.bool, device=device))


def eos_token_ids(tokenizer, model) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts without the EOS token and padding."""
    texts = []
    for ids, mask, ended in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist(),
                                rollout.ended_with_eos.tolist()):
        length = sum(mask) - (1 if ended else 0)
        texts.append(tokenizer.decode(ids[:length], skip_special_tokens=False))
    return texts


def greedy_generate(model, tokenizer, chats: list[list[dict]], max_new_tokens: int,
                    max_prompt_length: int, batch_size: int) -> list[str]:
    """Greedy completions of `chats`, batched."""
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(chats), batch_size):
        ids, mask = encode_prompts(tokenizer, chats[start : start + batch_size], max_prompt_length, device)
        rollout = sample(model, ids, mask, 1, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                         eos_token_ids(tokenizer, model), tokenizer.pad_token_id)
        texts.extend(decode_completions(tokenizer, rollout))
    return texts


class Trainer:
    def __init__(self, model, tokenizer, task: Task, strategy, learner: Learner, config: TrainerConfig,
                 run_dir: Path, stage_name: str = "rl", initial_stage_name: str = "initial"):
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.strategy = strategy
        self.learner = learner
        self.config = config
        self.run_dir = Path(run_dir)
        self.stage_name = stage_name
        self.initial_stage_name = initial_stage_name
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.cursor = PromptCursor(task.num_train_prompts(), config.seed)
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.step = 0

    # ------------------------------------------------------------------
    def resume(self, run_dir: Path) -> int:
        """Restore the newest complete checkpoint of `run_dir`; return its step (0 if none)."""
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            return 0
        state = load_checkpoint(checkpoint, self.model, self.learner.optimizer, self.learner.scheduler, self.generator)
        self.step = state["step"]
        self.cursor = PromptCursor(self.task.num_train_prompts(), self.config.seed, state["prompts_consumed"])
        return self.step

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir, self.step, self.model, self.tokenizer, self.learner.optimizer, self.learner.scheduler,
            self.generator, {"prompts_consumed": self.cursor.consumed, "stage": self.stage_name},
            keep_last=self.config.keep_checkpoints,
        )

    def evaluate(self) -> dict[str, float]:
        config = self.config
        return self.task.evaluate(
            lambda chats: greedy_generate(self.model, self.tokenizer, chats, config.sampling.max_new_tokens,
                                          config.max_prompt_length, config.eval_batch_size)
        )

    # ------------------------------------------------------------------
    def _rollout_and_score(self, num_prompts: int) -> tuple[Rollout, Tensor, list[str], float, float]:
        """Sample the next prompts and score them: (rollout, rewards, texts, rollout seconds, reward seconds)."""
        start = time.perf_counter()
        indices = self.cursor.take(num_prompts)
        chats = [self.task.train_messages(i) for i in indices]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, chats, self.config.max_prompt_length, self.device)
        rollout = sample(self.model, prompt_ids, prompt_mask, self.config.group_size, self.config.sampling,
                         self.eos_ids, self.tokenizer.pad_token_id, self.generator)
        texts = decode_completions(self.tokenizer, rollout)
        rollout_seconds = time.perf_counter() - start
        start = time.perf_counter()
        row_prompts = [indices[int(g)] for g in rollout.group_ids]
        rewards = torch.as_tensor(self.task.rewards(row_prompts, texts), dtype=torch.float32, device=self.device)
        if rewards.shape[0] != rollout.num_rows:
            raise ValueError(f"the task returned {rewards.shape[0]} rewards for {rollout.num_rows} completions")
        return rollout, rewards, texts, rollout_seconds, time.perf_counter() - start

    def train_step(self) -> dict:
        config = self.config
        step_start = time.perf_counter()
        time_rollout = time_reward = 0.0
        kept_rollouts, kept_rewards, texts_seen = [], [], []
        groups_sampled = groups_kept = 0
        raw_reward_sum = raw_reward_count = 0.0
        non_finite = filtered = False
        for _ in range(max(config.max_generation_rounds, 1)):
            needed = config.prompts_per_step - groups_kept
            rollout, rewards, texts, rollout_seconds, reward_seconds = self._rollout_and_score(needed)
            time_rollout += rollout_seconds
            time_reward += reward_seconds
            start = time.perf_counter()
            if not bool(torch.isfinite(rewards).all()):
                non_finite = True
                break
            raw_reward_sum += float(rewards.sum()) if rewards.dim() == 1 else float(rewards.sum(dim=1).sum())
            raw_reward_count += rewards.shape[0]
            texts_seen.extend(texts)
            rewards = self.strategy.shape_rewards(rewards, rollout)
            keep = self.strategy.keep_groups(rewards, rollout)  # [P] bool or None
            groups_sampled += needed
            filtered = keep is not None
            if keep is None:
                kept_rollouts.append(rollout)
                kept_rewards.append(rewards)
                groups_kept += needed
                time_reward += time.perf_counter() - start
                break
            kept_groups = keep.nonzero().squeeze(1)
            rows = torch.isin(rollout.group_ids, kept_groups).nonzero().squeeze(1)
            if rows.numel():
                kept_rollouts.append(rollout.select_rows(rows))
                kept_rewards.append(rewards[rows])
            groups_kept += int(kept_groups.numel())
            time_reward += time.perf_counter() - start
            if groups_kept >= config.prompts_per_step:
                break

        metrics: dict = {"step": self.step + 1}
        if non_finite:
            # Never train on a broken reward: the step is skipped and the weights stay untouched.
            metrics.update(skipped="non-finite reward (NaN or inf) returned by the task", reward_mean=None,
                           time_rollout_s=time_rollout, time_reward_s=time_reward, time_learn_s=0.0)
            return metrics
        metrics["reward_mean"] = raw_reward_sum / max(raw_reward_count, 1.0)
        if filtered:
            metrics["frac_groups_dropped"] = 1.0 - groups_kept / max(groups_sampled, 1)
        if not kept_rollouts:
            metrics.update(skipped="dynamic sampling kept no group (all rewards equal within every group)",
                           time_rollout_s=time_rollout, time_reward_s=time_reward, time_learn_s=0.0)
            return metrics

        rollout = Rollout.concatenate(kept_rollouts)
        rewards = torch.cat(kept_rewards)
        start = time.perf_counter()
        unit_ids = self.strategy.unit_ids(rollout, self.tokenizer)
        advantages = self.strategy.advantages(rewards, rollout, unit_ids)
        learner_metrics = self.learner.update(PolicyBatch(rollout, unit_ids, advantages))
        time_learn = time.perf_counter() - start

        tokens = int(rollout.completion_mask.sum())
        lengths = rollout.completion_lengths.float()
        metrics.update(
            learner_metrics,
            reward_std=float(rewards.std()) if rewards.numel() > 1 else 0.0,
            tokens=tokens,
            completion_length_mean=float(lengths.mean()),
            truncated_frac=float((~rollout.ended_with_eos).float().mean()),
            time_rollout_s=time_rollout,
            time_reward_s=time_reward,
            time_learn_s=time_learn,
            tokens_per_s=tokens / max(time.perf_counter() - step_start, 1e-9),
        )
        if rewards.dim() == 2:
            per_rank = rewards.mean(dim=0)
            for rank in range(per_rank.shape[0]):
                metrics[f"reward_rank_{rank + 1}"] = float(per_rank[rank])
        metrics["_sample"] = texts_seen[0] if texts_seen else ""
        return metrics

    def train(self, logger: RunLogger | None = None) -> dict[str, float]:
        """Run until `max_steps`; return the final evaluation."""
        config = self.config
        logger = logger or RunLogger(self.run_dir, config.max_steps, self.step, description=self.stage_name)
        try:
            if self.step == 0:
                self._evaluate_and_log(logger, stage=self.initial_stage_name)
            while self.step < config.max_steps:
                metrics = self.train_step()
                self.step += 1
                sample_text = metrics.pop("_sample", None)
                if "skipped" in metrics:
                    logger.message(f"step {self.step}: skipped ({metrics['skipped']})")
                logger.log_step(metrics)
                if sample_text is not None and config.log_samples_every and self.step % config.log_samples_every == 0:
                    logger.log_text("samples/completion", sample_text, self.step)
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                    self._evaluate_and_log(logger)
                if config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps:
                    self.save()
            final = self._evaluate_and_log(logger, stage=self.stage_name)
            self.save()
            return final
        finally:
            logger.close()

    def _evaluate_and_log(self, logger: RunLogger, stage: str | None = None) -> dict[str, float]:
        results = self.evaluate()
        logger.log_step({"step": self.step, "eval": True, **{f"eval/{k}": v for k, v in results.items()}})
        if stage is not None:
            write_eval(self.run_dir, stage, results)
        return results


def write_eval(run_dir: Path, stage: str, results: dict[str, float]) -> None:
    """Merge `{stage: results}` into run_dir/eval.json (written atomically)."""
    path = Path(run_dir) / "eval.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[stage] = results
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(existing, indent=2))
    temporary.replace(path)
