"""The RL loop: prompts -> rollout -> rewards -> strategy -> learner -> log / eval / checkpoint.

A `Task` provides prompts, rewards and an evaluation. The best policy on the validation split (by the task's
`selection_metric`) is kept as `checkpoints/best` and reported on the test split, which never chooses anything.
A step with non-finite rewards or log-probs is skipped; stalls are warned about; under torchrun every rank
samples its share of whole groups. Details: docs/engine.md, section engine/trainer.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from engine.checkpoint import CheckpointError, damaged_file, latest_checkpoint, load_checkpoint, save_checkpoint
from engine.config import check, check_choice
from engine.distributed import MODES, all_reduce, broadcast, full_weights, gather, rank_and_size, shard
from engine.learner import Learner, PolicyBatch, Rewards, TrainingFailed
from engine.loss import group_reward_spread
from engine.logging import RunLogger
from engine.rollout import DecoderFactory, Rollout, SamplingConfig, sample
from engine.tokens import decode_completions, encode_prompts, eos_token_ids


class Task(Protocol):
    """A verifiable task: chat prompts, a reward function, and an evaluation. Optional members: `logits_hook`
    (engine.logprobs.LogitsHook), `stop_token_ids(tokenizer) -> list[int]` (besides EOS), `state_dict()` /
    `load_state_dict(state)` (checkpointed)."""

    def num_train_prompts(self) -> int: ...

    def train_messages(self, index: int) -> list[dict]: ...

    def rewards(self, prompt_indices: list[int], completions: list[str], rollout: Rollout) -> Tensor | Rewards:
        """[B] (one reward per completion), [B, U] or `Rewards`; NaN marks a broken reward."""
        ...

    def evaluate(self, generate: Callable[..., list[str]], split: str = "test") -> dict[str, float]:
        """Metrics of greedy completions on the "val" or "test" prompts; `generate(chats,
        prompt_indices=None, logits_hook=None)` maps chats to texts. The task's `selection_metric`
        attribute names the metric (higher is better) that chooses the reported checkpoint."""
        ...


NAN_REWARD = "non-finite reward (NaN or inf) returned by the task"
NAN_POLICY = "non-finite sampled log-prob (NaN or inf logit)"
# conditions whose consecutive steps are counted, and warned about past `stall_warning_steps`
STALL_CONDITIONS = ("no reward spread in any group", "gradient norm 0", NAN_REWARD, NAN_POLICY)


class TrainingInterrupted(Exception):
    """`Trainer.train` stopped on `stop_requested` (signal `args[1]`), after writing the checkpoint `args[0]`."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    prompts_per_step: int = 4
    group_size: int = 8  # G completions per prompt
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    save_every: int = 0  # 0 = only at the end
    eval_every: int = 0  # 0 = only before and after training
    max_generation_rounds: int = 1  # dynamic sampling: rollouts per step at most
    eval_batch_size: int = 32
    log_samples_every: int = 10
    keep_checkpoints: int = 2
    stall_warning_steps: int = 5  # warn after this many steps without reward spread or gradient
    distributed: str = "ddp"  # under torchrun: "ddp" (whole weights on every rank) or "fsdp2" (sharded per block)

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        check(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, "must be >= 1")
        check(self.group_size >= 2, "group_size", self.group_size,
              "must be >= 2 (group-relative advantages of a single sample are 0: nothing would be learnt)")
        check(self.max_prompt_length >= 1, "max_prompt_length", self.max_prompt_length, "must be >= 1")
        for name in ("save_every", "eval_every", "log_samples_every"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0 (0 = off)")
        for name in ("max_generation_rounds", "eval_batch_size", "keep_checkpoints", "stall_warning_steps"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        check_choice("distributed", self.distributed, MODES)


class PromptSource:
    """Prompt indices in epochs. Each epoch starts from a seeded permutation, which
    `order_prompts(epoch, order) -> order` may reorder or shorten (a curriculum)."""

    def __init__(self, num_prompts: int, seed: int, order_prompts: Callable[[int, list[int]], list[int]] | None = None):
        if num_prompts < 1:
            raise ValueError("the task has no training prompts")
        self.num_prompts, self.seed, self.order_prompts = num_prompts, seed, order_prompts
        self.epoch, self.position, self.order, self.consumed = -1, 0, [], 0

    def take(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            if self.position >= len(self.order):
                self._next_epoch()
            indices.append(self.order[self.position])
            self.position += 1
        self.consumed += count
        return indices

    def _next_epoch(self) -> None:
        self.epoch += 1
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_prompts).tolist()
        if self.order_prompts is not None:
            order = broadcast([int(i) for i in self.order_prompts(self.epoch, order)])  # rank 0's, on every rank
            if not order:
                raise RuntimeError(f"order_prompts left no prompt for epoch {self.epoch}: every prompt was dropped")
        self.order, self.position = order, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "order": self.order, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.order, self.consumed = (state["epoch"], state["position"], list(state["order"]),
                                                                state["consumed"])


def completion_stop_ids(task, tokenizer, model) -> list[int]:
    """The tokens that end a completion: EOS (engine.tokens.eos_token_ids) and the task's `stop_token_ids`."""
    stop = getattr(task, "stop_token_ids", None)
    return sorted(set(eos_token_ids(tokenizer, model)) | set(stop(tokenizer) if stop else []))


def greedy_generate(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, max_prompt_length: int,
                    batch_size: int, stop_token_ids: list[int], make_decoder: DecoderFactory | None = None,
                    prompt_indices: list[int] | None = None, logits_hook=None) -> list[str]:
    """Greedy completions of `chats`, batched (under the task's `logits_hook` if given)."""
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(chats), batch_size):
        ids, mask = encode_prompts(tokenizer, chats[start : start + batch_size], max_prompt_length, device)
        indices = None if prompt_indices is None else torch.tensor(prompt_indices[start : start + batch_size])
        rollout = sample(model, ids, mask, 1, SamplingConfig(max_new_tokens=max_new_tokens), stop_token_ids,
                         tokenizer.pad_token_id, greedy=True, logits_hook=logits_hook, prompt_indices=indices,
                         make_decoder=make_decoder)
        texts.extend(decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask,
                                        rollout.ended_with_eos))
    return texts


class Trainer:
    def __init__(self, model, tokenizer, task: Task, strategy, learner: Learner, config: TrainerConfig,
                 sampling: SamplingConfig, run_dir: Path, seed: int = 0, stage_name: str = "rl",
                 initial_stage_name: str = "initial", make_decoder: DecoderFactory | None = None):
        self.model, self.tokenizer, self.task, self.strategy, self.learner = model, tokenizer, task, strategy, learner
        self.config, self.sampling, self.seed, self.make_decoder = config, sampling, seed, make_decoder
        self.run_dir = Path(run_dir)
        self.stage_name, self.initial_stage_name = stage_name, initial_stage_name
        self.device = next(model.parameters()).device
        self.rank = rank_and_size()[0]
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + 7919 * self.rank)  # each rank samples its own completions
        self.prompts = PromptSource(task.num_train_prompts(), seed, strategy.order_prompts)
        self.stop_ids = completion_stop_ids(task, tokenizer, model)
        self.logits_hook = getattr(task, "logits_hook", None)
        self.step, self.stop_requested = 0, 0  # stop_requested: a signal number, 0 = none
        self.stalled = {condition: 0 for condition in STALL_CONDITIONS}  # consecutive steps each has held
        self.updated_steps = 0  # steps that applied at least one optimizer step (not skipped as a whole)
        self.selection = {"metric": task.selection_metric, "split": "val", "best_step": None, "best_value": None,
                          "history": []}

    # ------------------------------------------------------------------
    def resume(self, run_dir: Path) -> int:
        """Restore the newest complete checkpoint of `run_dir`; return its step (0 if none)."""
        checkpoint = latest_checkpoint(run_dir, warn=print if self.rank == 0 else lambda text: None)
        if checkpoint is None:
            return 0
        state, components = load_checkpoint(checkpoint, self.model, self.learner.optimizer, self.learner.scheduler,
                                            self.generator)
        self.step = state["step"]
        self.prompts.load_state_dict(state["prompts"])
        self.stalled, self.selection = state["stalled"], state["selection"]
        self.updated_steps = state.get("updated_steps", self.step)  # absent from checkpoints before it was kept
        self._restore_components(components)
        return self.step

    def save(self, name: str | None = None) -> Path:
        components = {"strategy": self.strategy.state_dict(),
                      "task": self.task.state_dict() if hasattr(self.task, "state_dict") else {}}
        state = {"prompts": self.prompts.state_dict(), "stalled": self.stalled, "selection": self.selection,
                 "updated_steps": self.updated_steps,
                 "stage": self.stage_name}
        return save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, self.learner.optimizer,
                               self.learner.scheduler, self.generator, state, components,
                               keep_last=self.config.keep_checkpoints, name=name)

    def _load_weights(self, checkpoint: Path) -> None:
        """The model, strategy and task state of a checkpoint (not the optimizer or RNG states)."""
        damaged = broadcast(damaged_file(checkpoint) if self.rank == 0 else None)  # rank 0 decides, as on resume
        if damaged is not None:
            raise CheckpointError(f"checkpoint {checkpoint} is damaged ({damaged}), so the weights chosen on "
                                  f"validation cannot be tested; rerun the experiment")
        self._restore_components(load_checkpoint(checkpoint, self.model, None, None, None)[1])

    def _restore_components(self, components: dict) -> None:
        self.strategy.load_state_dict(components["strategy"])
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(components["task"])

    def generate(self, chats: list[list[dict]], prompt_indices: list[int] | None = None, logits_hook=None) -> list[str]:
        """Greedy completions, as tasks evaluate them (each rank completes its share of `chats`)."""
        with full_weights(self.model):
            texts = greedy_generate(self.model, self.tokenizer, shard(chats), self.sampling.max_new_tokens,
                                    self.config.max_prompt_length, self.config.eval_batch_size, self.stop_ids,
                                    self.make_decoder, None if prompt_indices is None else shard(prompt_indices),
                                    logits_hook)
        return [text for share in gather(texts) for text in share]

    def evaluate(self, split: str = "test") -> dict[str, float]:
        return self.task.evaluate(self.generate, split)

    # ------------------------------------------------------------------
    def _rollout_and_score(self, num_prompts: int) -> tuple[Rollout, Rewards, list[str], float, float]:
        """Sample the next prompts and score them: (rollout, rewards, texts, rollout seconds, reward seconds)."""
        start = time.perf_counter()
        indices = shard(self.prompts.take(num_prompts))  # this rank's share
        chats = [self.task.train_messages(i) for i in indices]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, chats, self.config.max_prompt_length, self.device)
        with full_weights(self.model):
            rollout = sample(self.model, prompt_ids, prompt_mask, self.config.group_size, self.sampling,
                             self.stop_ids, self.tokenizer.pad_token_id, self.generator, logits_hook=self.logits_hook,
                             prompt_indices=torch.tensor(indices, device=self.device), make_decoder=self.make_decoder)
        texts = decode_completions(self.tokenizer, rollout.completion_ids, rollout.completion_mask,
                                   rollout.ended_with_eos)
        rollout_seconds = time.perf_counter() - start
        start = time.perf_counter()
        rewards = self.task.rewards(rollout.prompt_indices.tolist(), texts, rollout)
        if not isinstance(rewards, Rewards):
            rewards = Rewards.from_tensor(torch.as_tensor(rewards, dtype=torch.float32))
        rewards = Rewards(rewards.values.to(self.device), rewards.mask.to(self.device).bool(),
                          {key: value.to(self.device) for key, value in rewards.extras.items()})
        if rewards.num_rows != rollout.num_rows or rewards.mask.shape != rewards.values.shape:
            raise ValueError(f"the task returned rewards of shape {tuple(rewards.values.shape)} (mask "
                             f"{tuple(rewards.mask.shape)}) for {rollout.num_rows} completions; expected [B] or [B, U]")
        return rollout, rewards, texts, rollout_seconds, time.perf_counter() - start

    def train_step(self) -> dict:
        config = self.config
        step_start = time.perf_counter()
        time_rollout = time_reward = 0.0
        kept_rollouts, kept_rewards, texts_seen = [], [], []
        groups_sampled = groups_kept = local_groups = 0  # groups over all ranks; local_groups: this rank's
        raw_values = []  # [B] per completion: the sum of its units' rewards as the task gave them (before shaping)
        non_finite, filtered, size = None, False, rank_and_size()[1]
        spread = []
        for _ in range(config.max_generation_rounds):
            needed = -(-(config.prompts_per_step - groups_kept) // size) * size  # rounded up: a share for every rank
            rollout, rewards, texts, rollout_seconds, reward_seconds = self._rollout_and_score(needed)
            time_rollout += rollout_seconds
            time_reward += reward_seconds
            start = time.perf_counter()
            broken = all_reduce(torch.tensor([float(not torch.isfinite(values).all()) for values in (
                rewards.values[rewards.mask], rollout.old_logprobs[rollout.completion_mask])]), "max")
            if bool(broken.any()):  # on any rank
                non_finite = NAN_REWARD if broken[0] else NAN_POLICY
                break
            raw_values.append(rewards.values.masked_fill(~rewards.mask, 0.0).sum(dim=1))
            texts_seen.extend(texts)
            rewards = self.strategy.shape_rewards(rewards, rollout)
            spread.append(group_reward_spread(rewards.values, rewards.mask, rollout.group_ids))
            keep = self.strategy.keep_groups(rewards, rollout)  # [P] bool or None
            groups_sampled += needed
            filtered = keep is not None
            rows = (torch.arange(rollout.num_rows, device=self.device) if keep is None
                    else torch.isin(rollout.group_ids, keep.nonzero().squeeze(1)).nonzero().squeeze(1))
            if rows.numel():
                kept_rollouts.append(rollout.select_rows(rows))
                kept_rewards.append(rewards.select_rows(rows))
            local_groups += rollout.num_rows // config.group_size if keep is None else int(keep.sum())
            groups_kept = int(all_reduce(torch.tensor(local_groups), "sum"))
            time_reward += time.perf_counter() - start
            if groups_kept >= config.prompts_per_step:
                break

        metrics: dict = {"step": self.step + 1, "epoch": self.prompts.epoch, "prompts_consumed": self.prompts.consumed}
        timings = dict(time_rollout_s=time_rollout, time_reward_s=time_reward, time_learn_s=0.0)
        self._watch(NAN_POLICY, non_finite == NAN_POLICY, metrics)
        self._watch(NAN_REWARD, non_finite == NAN_REWARD, metrics)
        if non_finite:
            # Never train on a broken reward or policy: the step is skipped and the weights stay untouched.
            metrics.update(skipped=non_finite, reward_mean=None, **timings)
            return metrics
        raw = torch.cat(raw_values).double()  # [n] every completion sampled on this rank, kept or not
        total, squares, count = all_reduce(torch.stack([raw.sum(), (raw**2).sum(), torch.tensor(
            float(raw.numel()), dtype=torch.float64)])).tolist()  # over all ranks
        metrics["reward_mean"] = total / max(count, 1.0)
        metrics["reward_std"] = (max(squares - count * metrics["reward_mean"] ** 2, 0.0) / (count - 1)) ** 0.5 \
            if count > 1 else 0.0  # unbiased, of the same rewards as reward_mean
        metrics["zero_spread_frac"] = 1.0 - float(torch.cat(spread).float().mean())
        if filtered:
            metrics["frac_groups_dropped"] = 1.0 - groups_kept / max(groups_sampled, 1)
        common = int(all_reduce(torch.tensor(local_groups), "min"))  # the same number of groups on every rank
        if common == 0:
            self._watch("no reward spread in any group", True, metrics)
            metrics.update(skipped="dynamic sampling kept no group (all rewards equal within every group)", **timings)
            return metrics

        rollout, rewards = Rollout.concatenate(kept_rollouts), Rewards.concatenate(kept_rewards)
        if common < local_groups:
            rows = (rollout.group_ids < common).nonzero().squeeze(1)
            rollout, rewards = rollout.select_rows(rows), rewards.select_rows(rows)
        start = time.perf_counter()
        unit_ids = self.strategy.unit_ids(rollout, rewards)  # [B, T]
        advantages = self.strategy.advantages(rewards, rollout, unit_ids)  # [B, T]
        batch = PolicyBatch(rollout, rewards, unit_ids, advantages, self.strategy.num_units(rewards))
        learner_metrics = self.learner.update(batch)
        time_learn = time.perf_counter() - start

        tokens = int(all_reduce(rollout.completion_mask.sum()))
        metrics.update(
            learner_metrics,
            tokens=tokens,
            completion_length_mean=float(rollout.completion_lengths.float().mean()),
            truncated_frac=float((~rollout.ended_with_eos).float().mean()),
            time_rollout_s=time_rollout,
            time_reward_s=time_reward,
            time_learn_s=time_learn,
            tokens_per_s=tokens / max(time.perf_counter() - step_start, 1e-9),
        )
        if rewards.values.shape[1] > 1 and bool(rewards.mask.all()):
            for unit, value in enumerate(rewards.values.mean(dim=0).tolist()):
                metrics[f"reward_unit_{unit + 1}"] = value
        self._watch("no reward spread in any group", metrics["zero_spread_frac"] == 1.0, metrics)
        self._watch("gradient norm 0", learner_metrics["grad_norm"] == 0.0, metrics)
        self.updated_steps += int(learner_metrics.get("optimizer_steps", 1) > 0)
        if learner_metrics.get("skipped_optimizer_steps"):
            metrics["skipped"] = (f"{learner_metrics['skipped_optimizer_steps']} optimizer step(s): non-finite loss "
                                  "or gradient (NaN log-probs in the learner?)")
        metrics["_sample"] = texts_seen[0] if texts_seen else ""
        return metrics

    def _stop_if_the_policy_is_broken(self) -> None:
        """Skipped steps leave the weights as they are, so a policy whose logits stay NaN never recovers: stop."""
        steps = self.stalled.get(NAN_POLICY, 0)
        if steps < self.config.stall_warning_steps:
            return
        cause = (f"the RL updates diverged: lower learner.lr (now {self.learner.config.lr:g}) or learner.max_grad_norm"
                 if self.updated_steps else "no RL step has updated it yet, so the model it started from is broken "
                 "(the SFT warm start or --model) or the task's logits hook makes NaN")
        raise TrainingFailed(f"step {self.step}: the policy has sampled NaN or inf log-probs for {steps} steps in a "
                             f"row; {cause}")

    def _watch(self, condition: str, holds: bool, metrics: dict) -> None:
        """Count consecutive steps on which `condition` holds; past the limit, say so in the metrics."""
        self.stalled[condition] = self.stalled.get(condition, 0) + 1 if holds else 0
        if self.stalled[condition] >= self.config.stall_warning_steps:
            warning = (f"{condition} for {self.stalled[condition]} steps in a row: the policy is not learning "
                       "(check the rewards and the learning rate)")
            metrics["warning"] = f"{metrics['warning']}; {warning}" if "warning" in metrics else warning

    def train(self, logger: RunLogger | None = None) -> dict[str, float]:
        """Run until `max_steps`; return the final evaluation."""
        config = self.config
        logger = logger or RunLogger(self.run_dir, config.max_steps, self.step, self.stage_name, self.rank == 0)
        try:
            if self.step == 0:
                write_eval(self.run_dir, self.initial_stage_name, self._evaluate_and_log(logger, "test"))
                self._validate(logger)
            while self.step < config.max_steps:
                metrics = self.train_step()
                self.step += 1
                sample_text = metrics.pop("_sample", None)
                for key in ("skipped", "warning"):
                    if key in metrics:
                        logger.message(f"step {self.step}: {key}: {metrics[key]}")
                logger.log_step(metrics)
                self._stop_if_the_policy_is_broken()
                if sample_text is not None and config.log_samples_every and self.step % config.log_samples_every == 0:
                    logger.log_text("samples/completion", sample_text, self.step)
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                    self._validate(logger)
                if config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps:
                    self.save()
                stop = int(all_reduce(torch.tensor(self.stop_requested), "max"))  # requested on any rank
                if stop:
                    raise TrainingInterrupted(self.save(), stop)
            if self.updated_steps == 0:
                raise TrainingFailed(
                    f"none of the {self.step} RL steps updated the weights: every one was skipped (metrics.jsonl's "
                    f"'skipped' says why, step by step): non-finite rewards or sampled log-probs, no group kept by "
                    f"dynamic sampling, or a non-finite loss or gradient in the learner")
            if not self.selection["history"] or self.selection["history"][-1][0] != self.step:
                self._validate(logger)
            self.save()
            last = self._evaluate_and_log(logger, "test")
            best = last
            if self.selection["best_step"] != self.step:
                self._load_weights(self.run_dir / "checkpoints" / "best")
                best = self.evaluate("test")
            write_eval(self.run_dir, self.stage_name, best)
            write_eval(self.run_dir, f"{self.stage_name}/last", last)
            atomic_write_json(self.run_dir / "selection.json", self.selection)
            return best
        finally:
            logger.close()

    def _evaluate_and_log(self, logger: RunLogger, split: str) -> dict[str, float]:
        start = time.perf_counter()
        results = self.evaluate(split)
        logger.log_step({"step": self.step, "eval": True, "split": split, "time_eval_s": time.perf_counter() - start,
                         **{f"eval/{k}": v for k, v in results.items()}})
        return results

    def _validate(self, logger: RunLogger) -> None:
        """Evaluate on the validation split; keep the model as `checkpoints/best` when it is the best so far."""
        results = self._evaluate_and_log(logger, "val")
        metric = self.selection["metric"]
        if metric not in results:
            raise ValueError(f"the task's selection_metric {metric!r} is not among its metrics {sorted(results)}")
        value = float(results[metric])
        self.selection["history"].append([self.step, value])
        if self.selection["best_value"] is None or value > self.selection["best_value"]:
            self.selection.update(best_step=self.step, best_value=value)
            self.save(name="best")


def write_eval(run_dir: Path, stage: str, results: dict[str, float]) -> None:
    """Merge `{stage: results}` into run_dir/eval.json."""
    path = Path(run_dir) / "eval.json"
    atomic_write_json(path, {**(json.loads(path.read_text()) if path.exists() else {}), stage: results})


def atomic_write_json(path: Path, value) -> None:
    """Write JSON to a temporary file and rename it over `path`, so a reader never sees half a file (rank 0 only)."""
    if rank_and_size()[0] != 0:
        return
    temporary = Path(path).with_suffix(".json.tmp")
    temporary.write_text(json.dumps(value, indent=2))
    temporary.replace(path)
