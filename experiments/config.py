"""The experiment config: one tree of typed dataclasses, one default per knob.

    ExperimentConfig                      run: name, kind, task_type, algorithm, seed, device
      model     ModelConfig               path (a checkpoint) or a tiny model: vocab_size, tiny (models.tiny.TinyModelConfig)
      task      the task's config         experiments/sort_task.py, experiments/rec_task.py
      sampling  engine.rollout.SamplingConfig
      trainer   engine.trainer.TrainerConfig
      learner   engine.learner.LearnerConfig   (the loss settings: engine.loss.LossConfig)
      strategy  the strategy's Config     algorithms/*.py
      sft       engine.sft.SFTConfig

Every leaf is a key, written with dots (`learner.clip_ratio_high`); a leaf's own name works
alone where no other leaf has it (`clip_ratio_high`, but not `lr`: `learner.lr` or `sft.lr`).
A value is resolved in this order, each layer overriding the one before:

    1. the dataclass field's default (the engine's neutral value)
    2. the strategy's paper defaults (`Strategy.defaults` in algorithms/*.py)
    3. the experiment's settings (experiments/registry.py), then its `--quick` settings
    4. the command line: --set key=value, --model, --device

Every value is checked when it is set (the dataclasses' `__post_init__`) and the tree as a
whole once it is complete, before any data is read or any model is built; a bad value is a
`ConfigError` naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from algorithms.base import REWARD_SHAPES, Strategy, StrategyConfig
from algorithms.registry import STRATEGIES, strategy_class
from engine.config import ConfigError, check, check_choice
from engine.learner import LearnerConfig
from engine.rollout import SamplingConfig
from engine.sft import SFTConfig
from engine.trainer import TrainerConfig
from models.tiny import TinyModelConfig

KINDS = ("rl", "sft", "baselines")
DEVICES = ("cpu", "cuda")
# settings a resumed run may change; everything else must match the run being resumed
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.eval_every", "trainer.save_every", "trainer.log_samples_every")


class UsageError(Exception):
    """Bad input from the command line or a registry entry; reported as one line with exit code 2."""


@dataclass
class ModelConfig:
    path: str | None = None  # a save_pretrained folder or a hub id; None = a tiny model built from `tiny`
    vocab_size: int = 512  # of the tokenizer trained for a tiny model
    gradient_checkpointing: bool = False  # recompute decoder activations in backward: less memory, ~30% more time
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        check(self.vocab_size >= 16, "vocab_size", self.vocab_size, "must be >= 16")


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str
    kind: str  # rl (SFT warm start if sft.steps > 0, then RL) | sft | baselines
    task_type: str  # a key of experiments.registry.TASKS
    algorithm: str  # a key of algorithms.registry.STRATEGIES
    seed: int = 0
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: object  # the task's config dataclass
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    strategy: StrategyConfig
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("device", self.device, DEVICES)
        check(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32) (numpy's seed range)")
        check_choice("algorithm", self.algorithm, sorted(STRATEGIES))


FIXED_KEYS = ("name", "kind", "task_type")  # set by the registry entry, never from the command line


# ---------------------------------------------------------------------------
# walking the tree
# ---------------------------------------------------------------------------


def leaves(config, prefix: str = "") -> dict[str, tuple[object, object, object]]:
    """{dotted key: (annotation, value, field default)} of every leaf below `config`."""
    hints = typing.get_type_hints(type(config))
    found = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            found.update(leaves(value, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            found[key] = (hints[f.name], value, default)
    return found


def resolve_key(config: ExperimentConfig, key: str) -> str:
    """The dotted key that `key` (dotted, or a leaf name no other leaf has) names."""
    keys = leaves(config)
    if key in keys:
        return key
    matches = [dotted for dotted in keys if dotted.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"--set {key}: ambiguous; write one of {', '.join(sorted(matches))}")
    raise UsageError(f"--set {key}: unknown config key; `python -m experiments.run {config.name} --show-config` "
                     "lists every key")


def parse_value(key: str, text: str, annotation) -> object:
    """Parse command-line `text` as the type of `key` (int, float, str, bool, or X | None)."""
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in options:
        if text.lower() in ("none", "null"):
            return None
        (annotation,) = [option for option in options if option is not type(None)]
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return lowered in ("1", "true", "yes", "on")
        elif annotation is int:
            return int(text)
        elif annotation is float:
            value = float(text)
            if not math.isfinite(value):
                raise UsageError(f"--set {key}={text}: expected a finite number (no setting takes nan or inf)")
            return value
        elif annotation is str:
            return text
    except ValueError:
        pass
    raise UsageError(f"--set {key}={text}: expected a value of type {type_name(annotation)}")


def type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def coerce(key: str, value, annotation) -> object:
    """Check a Python value (registry settings, config.json) against `annotation`; ints pass as floats."""
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in options:
        if value is None:
            return None
        (annotation,) = [option for option in options if option is not type(None)]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UsageError(f"{key}={value!r}: expected a finite number (no setting takes nan or inf)")
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise UsageError(f"{key}={value!r}: expected a value of type {type_name(annotation)}")


def set_value(config, dotted: str, value):
    """A copy of `config` with the leaf `dotted` set to `value`; the sections on the way are re-validated."""
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(config, **{head: set_value(getattr(config, head), rest, value) if rest else value})


def apply(config: ExperimentConfig, settings: dict[str, object]) -> ExperimentConfig:
    """Apply {dotted key: Python value} settings (registry entries, strategy defaults, config.json)."""
    for key, value in settings.items():
        dotted = resolve_key(config, key)
        if dotted in FIXED_KEYS:
            raise UsageError(f"{dotted} cannot be set; it is fixed by the experiment")
        annotation = leaves(config)[dotted][0]
        config = _set_checked(config, dotted, coerce(dotted, value, annotation), repr(value))
    return config


def apply_command_line(config: ExperimentConfig, assignments: list[str]) -> ExperimentConfig:
    """Apply --set key=value strings."""
    for assignment in assignments:
        if "=" not in assignment:
            raise UsageError(f"--set {assignment!r}: expected key=value")
        key, text = (part.strip() for part in assignment.split("=", 1))
        dotted = resolve_key(config, key)
        if dotted in FIXED_KEYS:
            raise UsageError(f"--set {dotted}: cannot be set; choose another experiment (--list)")
        config = _set_checked(config, dotted, parse_value(dotted, text, leaves(config)[dotted][0]), text)
    return config


def _set_checked(config: ExperimentConfig, dotted: str, value, shown: str) -> ExperimentConfig:
    """`set_value`, with a failed check reported against the dotted key."""
    try:
        return set_value(config, dotted, value)
    except ConfigError as error:
        section, _, name = dotted.rpartition(".")
        if error.key == name:
            raise UsageError(f"{dotted}={shown}: {error.allowed}") from None
        # a rule of the section that ties this value to another of its fields
        raise UsageError(f"{dotted}={shown}: then {section + '.' if section else ''}{error}") from None


# ---------------------------------------------------------------------------
# building and checking a whole tree
# ---------------------------------------------------------------------------


def default_tree(name: str, kind: str, task_type: str, algorithm: str, task_config_class) -> ExperimentConfig:
    """Engine defaults overridden by the strategy's paper defaults."""
    try:
        strategy = strategy_class(algorithm)
    except ValueError as error:
        raise UsageError(str(error)) from None
    config = ExperimentConfig(name=name, kind=kind, task_type=task_type, algorithm=algorithm,
                              task=task_config_class(), strategy=strategy.Config())
    return apply(config, strategy.defaults)


def check_tree(config: ExperimentConfig) -> None:
    """Rules that involve more than one section (each section checked itself when set)."""
    strategy = strategy_class(config.algorithm)
    if config.learner.loss_agg_mode == "seq_mean_unit_mean" and strategy.num_units is Strategy.num_units:
        raise UsageError(f"learner.loss_agg_mode=seq_mean_unit_mean: {config.algorithm} has no units to average "
                         "over (use rank_grpo or gspo, or another aggregation)")
    given = config.task.reward_shape()
    if config.kind == "rl" and given not in strategy.reward_shapes:
        fitting = [name for name, cls in STRATEGIES.items() if given in cls.reward_shapes]
        setting = getattr(config.task, "reward_setting", None)
        raise UsageError(
            f"algorithm={config.algorithm} learns from {REWARD_SHAPES[strategy.reward_shapes[0]]}, but the "
            f"{config.task_type} task gives {REWARD_SHAPES[given]}: use {' or '.join(fitting) or 'another task'}"
            + (f", or change {setting}" if setting else ""))
    rows = config.trainer.prompts_per_step * config.trainer.group_size
    if config.kind == "rl" and config.learner.mini_batches > rows:
        raise UsageError(f"learner.mini_batches={config.learner.mini_batches}: must be <= the rows of a step, "
                         f"trainer.prompts_per_step x trainer.group_size = {rows}")
    if config.model.path is None:
        needed = config.trainer.max_prompt_length + config.sampling.max_new_tokens
        if config.model.tiny.max_position_embeddings < needed:
            raise UsageError(
                f"model.tiny.max_position_embeddings={config.model.tiny.max_position_embeddings}: must be >= "
                f"trainer.max_prompt_length + sampling.max_new_tokens = {needed}")


def to_dict(config: ExperimentConfig) -> dict:
    return dataclasses.asdict(config)


def describe(config: ExperimentConfig, defaults: ExperimentConfig) -> str:
    """Every key with its type, this experiment's value, its default (the engine's, or the strategy's paper
    value; `defaults` is `default_tree`'s) and its short name where that is unambiguous."""
    keys, default_values = leaves(config), leaves(defaults)
    names = [dotted.rsplit(".", 1)[-1] for dotted in keys]
    rows = [("key", "type", "value", "default", "short name")]
    for dotted, (annotation, value, _) in keys.items():
        short = dotted.rsplit(".", 1)[-1]
        rows.append((dotted, type_name(annotation), repr(value), repr(default_values[dotted][1]),
                     short if names.count(short) == 1 and short != dotted else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
