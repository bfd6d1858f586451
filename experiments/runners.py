"""Turn an `ExperimentConfig` into a run: task, tokenizer, model, strategy, learner, trainer.

Kinds of experiment:
    rl          RL on a task (sort or recommendation) from the configured model
    baselines   classical recommenders (popularity, item-kNN, EASE) on MovieLens-100K
    sft         supervised warm start only (recommendation)
    rl_pipeline SFT warm start (cached per config), then RL from it (recommendation)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from algorithms.base import make_strategy, strategy_class
from engine.learner import Learner, LearnerConfig
from engine.rollout import SamplingConfig
from engine.sft import SFTConfig, supervised_finetune
from engine.trainer import Trainer, TrainerConfig
from experiments.data.common import cache_dir
from experiments.registry import ExperimentConfig
from experiments.run import write_config
from models.loader import ModelLoadError, enable_activation_checkpointing, load_model_and_tokenizer
from models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer


class ExperimentError(Exception):
    """A problem with the experiment's inputs (data, model, config); reported in one line."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tiny_model_config(config: ExperimentConfig) -> TinyModelConfig:
    return TinyModelConfig(
        architecture=config.architecture,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=max(2048, config.max_prompt_length + config.max_new_tokens),
    )


def build_policy(config: ExperimentConfig, corpus: list[str], initial_model: str | None = None):
    """(model, tokenizer): `initial_model` or `config.model` when given, else a tiny model + local tokenizer."""
    source = initial_model or config.model
    if source:
        try:
            model, tokenizer = load_model_and_tokenizer(source, device=config.device)
        except ModelLoadError as error:
            raise ExperimentError(str(error)) from error
        return model, tokenizer
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_tiny_model(
        tiny_model_config(config), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, seed=config.seed,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(config.device), tokenizer


def learner_config(config: ExperimentConfig) -> LearnerConfig:
    return LearnerConfig(
        lr=config.lr, weight_decay=config.weight_decay, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm, ppo_epochs=config.ppo_epochs, mini_batches=config.mini_batches,
        micro_batch_size=config.micro_batch_size, clip_ratio_low=config.clip_ratio_low,
        clip_ratio_high=config.clip_ratio_high, clip_ratio_c=config.clip_ratio_c, loss_agg_mode=config.loss_agg_mode,
        loss_max_length=config.loss_max_length or config.max_new_tokens,  # Dr. GRPO's constant L_max
        kl_loss_type=config.kl_loss_type, kl_coef=config.kl_coef, reference_offload=config.reference_offload,
        lr_schedule=config.lr_schedule, warmup_steps=config.warmup_steps,
        total_steps=config.max_steps * config.ppo_epochs * config.mini_batches,
    )


def trainer_config(config: ExperimentConfig) -> TrainerConfig:
    return TrainerConfig(
        seed=config.seed, max_steps=config.max_steps, prompts_per_step=config.prompts_per_step,
        group_size=config.group_size,
        sampling=SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                top_p=config.top_p, top_k=config.top_k, dtype=config.rollout_dtype),
        max_prompt_length=config.max_prompt_length, save_every=config.save_every, eval_every=config.eval_every,
        max_generation_rounds=config.max_generation_rounds,
    )


def build_strategy(config: ExperimentConfig, **extra):
    """The configured strategy; constructor arguments are taken from config fields of the same name."""
    try:
        cls = strategy_class(config.algorithm)
    except ValueError as error:
        raise ExperimentError(str(error)) from error
    parameters = inspect.signature(cls.__init__).parameters
    values = {**dataclasses.asdict(config), **extra}
    return make_strategy(config.algorithm, **{k: values[k] for k in parameters if k in values})


def run_rl(config: ExperimentConfig, run_dir: Path, task, corpus: list[str], resume: bool,
           initial_model: str | None = None, stage_name: str | None = None, initial_stage_name: str = "initial",
           extra_record: dict | None = None):
    """RL on `task` from `initial_model` (or the configured model); returns the final evaluation."""
    seed_everything(config.seed)
    model, tokenizer = build_policy(config, corpus, initial_model)
    reference_model = copy.deepcopy(model) if config.kl_coef > 0 else None
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    strategy = build_strategy(config, tokenizer=tokenizer)
    try:
        learner = Learner(model, learner_config(config), strategy, reference_model=reference_model)
        trainer = Trainer(model, tokenizer, task, strategy, learner, trainer_config(config), run_dir,
                          stage_name=stage_name or config.algorithm, initial_stage_name=initial_stage_name)
    except ValueError as error:
        raise ExperimentError(str(error)) from error
    if resume:
        step = trainer.resume(run_dir)
        print(f"resuming {config.name} from step {step}")
    else:
        write_config(run_dir, config, {"initial_model": initial_model or config.model or "tiny (random init)",
                                       **(extra_record or {})})
    return trainer.train()


SFT_KEYS = ("task", "seed", "model", "architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
            "intermediate_size", "vocab_size", "sort_min_digits", "sort_max_digits", "sort_train_size", "list_length",
            "sft_steps", "sft_lr", "sft_batch_size", "train_cut_points", "max_prompt_length", "max_new_tokens")


def sft_cache_dir(config: ExperimentConfig, data_source: str) -> Path:
    """Where the SFT checkpoint for this config lives: $RECRL_CACHE_DIR (default ~/.cache/recrl)/sft/<hash>."""
    identity = {key: getattr(config, key) for key in SFT_KEYS}
    identity["data_source"] = data_source
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "sft" / f"{config.task}-{digest}"


def run_sft_stage(config: ExperimentConfig, task, corpus: list[str], data_source: str) -> Path:
    """Supervised warm start, cached per config: returns a save_pretrained folder to start RL from."""
    folder = sft_cache_dir(config, data_source)
    if (folder / "config.json").exists():
        print(f"SFT: reusing cached checkpoint {folder}")
        return folder
    seed_everything(config.seed)
    model, tokenizer = build_policy(config, corpus)
    chats, completions = task.demonstrations()
    print(f"SFT: {config.sft_steps} steps on {len(chats)} demonstrations")
    sft_config = SFTConfig(steps=config.sft_steps, lr=config.sft_lr, batch_size=config.sft_batch_size,
                           max_prompt_length=config.max_prompt_length,
                           max_completion_length=max(config.max_new_tokens, 8), seed=config.seed)
    progress = tqdm(total=config.sft_steps, desc="sft", dynamic_ncols=True)

    def on_step(metrics):
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['sft_loss']:.3f}")

    history = supervised_finetune(model, tokenizer, chats, completions, sft_config, on_step=on_step)
    progress.close()
    temporary = folder.with_name(folder.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    (temporary / "sft_history.json").write_text(json.dumps(history))
    if folder.exists():
        shutil.rmtree(folder)
    temporary.rename(folder)
    return folder


def build_task(config: ExperimentConfig, data_dir: str | None):
    """(task, tokenizer corpus, data source description)."""
    if config.task == "sort":
        from experiments.sort_task import SortTask

        task = SortTask(config.sort_train_size, config.sort_eval_size, config.sort_min_digits,
                        config.sort_max_digits, config.seed)
        return task, task.corpus(), "built-in digit sorting"
    if config.task == "recommendation":
        from experiments.data import DataError, load_recommendation_data
        from experiments.rec_task import RecommendationTask

        try:
            data = load_recommendation_data(data_dir, list_length=config.list_length, teacher_demonstrations=True,
                                            verbose=False)
        except DataError as error:
            raise ExperimentError(str(error)) from error
        if data.source == "reddit-v2":
            print(f"data: Reddit-v2 conversations ({len(data.train)} train / {len(data.test)} test)")
        else:
            print(f"data: Reddit-v2 not found in the data dir; using the MovieLens-100K conversational set instead "
                  f"({len(data.train)} train / {len(data.test)} test requests)")
        list_length = data.list_length
        if list_length != config.list_length:
            raise ExperimentError(f"{data.source} prompts ask for {list_length} items; run with --set list_length={list_length}")
        task = RecommendationTask(data, list_length, config.reward_kind, config.reward_gamma, config.eval_size)
        return task, task.corpus(), data.source
    raise ExperimentError(f"unknown task {config.task!r}; use 'sort' or 'recommendation'")


def run_sft_only(config: ExperimentConfig, run_dir: Path, task, corpus: list[str], data_source: str) -> dict:
    """SFT (cached) and its evaluation on the test split, as stage "sft" of eval.json."""
    from engine.trainer import greedy_generate, write_eval

    folder = run_sft_stage(config, task, corpus, data_source)
    write_config(run_dir, config, {"data_source": data_source, "sft_checkpoint": str(folder)})
    model, tokenizer = load_model_and_tokenizer(str(folder), device=config.device)
    results = task.evaluate(lambda chats: greedy_generate(model, tokenizer, chats, config.max_new_tokens,
                                                          config.max_prompt_length,
                                                          batch_size=trainer_config(config).eval_batch_size))
    write_eval(run_dir, "sft", results)
    return results


def check_config(config: ExperimentConfig) -> None:
    """Reject malformed sampling / optimisation settings before any data or model work."""
    try:
        trainer_config(config), learner_config(config)
    except ValueError as error:
        raise ExperimentError(str(error)) from error


def run_experiment(config: ExperimentConfig, run_dir: Path, data_dir: str | None, resume: bool) -> None:
    check_config(config)
    if config.kind == "baselines":
        from experiments.baselines import run_baselines
        from experiments.data import DataError

        write_config(run_dir, config, {"data_source": "movielens-100k"})
        try:
            run_baselines(run_dir, data_dir=data_dir, list_length=config.list_length)
        except DataError as error:
            raise ExperimentError(str(error)) from error
        return
    task, corpus, data_source = build_task(config, data_dir)
    if config.kind == "sft":
        final = run_sft_only(config, run_dir, task, corpus, data_source)
        print("sft eval: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
        return
    if config.kind == "rl":
        initial_model = run_sft_stage(config, task, corpus, data_source) if config.sft_steps > 0 else None
        final = run_rl(config, run_dir, task, corpus, resume, initial_model=str(initial_model) if initial_model else None,
                       initial_stage_name="sft" if initial_model else "initial",
                       extra_record={"data_source": data_source})
        print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
        return
    raise ExperimentError(f"experiment kind {config.kind!r} is not supported")
