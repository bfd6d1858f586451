"""`python -m experiments.run NAME [options]`: run a named experiment.

    python -m experiments.run --list
    python -m experiments.run grpo_sort --quick
    python -m experiments.run rank_grpo_reddit --set lr=1e-5 --set max_steps=400
    python -m experiments.run grpo_sort --resume runs/grpo_sort-20261125-101500

Options: --out DIR, --data-dir DIR, --model PATH_OR_ID, --device cpu|cuda, --quick,
--resume DIR, --set key=value (repeatable; keys are the fields of
`experiments.registry.ExperimentConfig`). Bad input exits with code 2 and one line
saying what is wrong.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
import types
import typing
from pathlib import Path

import torch

from experiments.registry import EXPERIMENTS, ExperimentConfig, experiment_names


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit code 2."""


# ---------------------------------------------------------------------------
# config resolution
# ---------------------------------------------------------------------------


def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(ExperimentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ExperimentConfig)}


def parse_value(key: str, text: str, annotation) -> object:
    """Parse `text` as the type of config field `key` (int, float, str, bool, or X | None)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
    except ValueError:
        pass
    type_name = getattr(annotation, "__name__", str(annotation))
    raise UsageError(f"--set {key}={text}: expected a value of type {type_name}")


def apply_overrides(config: ExperimentConfig, assignments: list[str]) -> ExperimentConfig:
    types_by_key = _field_types()
    changes = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise UsageError(f"--set {assignment!r}: expected key=value")
        key, text = assignment.split("=", 1)
        key = key.strip()
        if key not in types_by_key or key in ("name", "kind"):
            raise UsageError(f"--set {key}: unknown config key; see the fields of ExperimentConfig in experiments/registry.py")
        changes[key] = parse_value(key, text.strip(), types_by_key[key])
    return dataclasses.replace(config, **changes)


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.exists():
            raise UsageError(f"--resume {args.resume}: no config.json there; pass the run directory of an earlier run")
        stored = json.loads(saved.read_text())["experiment"]
        if stored["name"] != args.name:
            raise UsageError(f"--resume {args.resume} is a run of {stored['name']!r}, not {args.name!r}")
        known = {f.name for f in dataclasses.fields(ExperimentConfig)}
        config = ExperimentConfig(**{k: v for k, v in stored.items() if k in known})
    else:
        experiment = EXPERIMENTS[args.name]
        config = copy.deepcopy(experiment.config)
        if args.quick:
            config = dataclasses.replace(config, **experiment.quick)
    config = apply_overrides(config, args.set)
    if args.model:
        config = dataclasses.replace(config, model=args.model)
    if args.device:
        config = dataclasses.replace(config, device=args.device)
    from algorithms.base import strategy_names

    if config.algorithm not in strategy_names():
        raise UsageError(f"unknown algorithm {config.algorithm!r}; known: {', '.join(strategy_names())}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return config


def describe_environment() -> dict:
    import numpy
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_config(run_dir: Path, config: ExperimentConfig, extra: dict) -> None:
    record = {
        "experiment": dataclasses.asdict(config),
        "environment": describe_environment(),
        "command": sys.argv,
        **extra,
    }
    (run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str))


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (reported as one line, exit code 2) instead of printing usage."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="experiment name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--out", help="run directory (default runs/NAME-TIMESTAMP)")
    parser.add_argument("--data-dir", help="data folder (else $RECRL_DATA_DIR, else ~/.cache/recrl)")
    parser.add_argument("--model", help="local checkpoint folder or hub id (default: a tiny model built here)")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a small version that finishes in minutes on 2 CPU cores")
    parser.add_argument("--resume", help="continue the run in this directory from its newest checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.list:
            width = max(len(n) for n in experiment_names())
            for name in experiment_names():
                print(f"{name:<{width}}  {EXPERIMENTS[name].description}")
            return 0
        if not args.name:
            raise UsageError("name an experiment (python -m experiments.run --list shows them)")
        if args.name not in EXPERIMENTS:
            raise UsageError(f"unknown experiment {args.name!r}; known: {', '.join(experiment_names())}")
        if args.resume and not Path(args.resume).is_dir():
            raise UsageError(f"--resume {args.resume}: no such run directory")
        config = resolve_config(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from experiments import runners  # imported late: --list and usage errors stay fast

    try:
        runners.check_config(config)
    except runners.ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(args.out or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.exists() and any(run_dir.iterdir()):
            print(f"error: --out {run_dir} is not empty; choose a new directory or --resume it", file=sys.stderr)
            return 2
    run_dir.mkdir(parents=True, exist_ok=True)

    try:
        runners.run_experiment(config, run_dir, data_dir=args.data_dir, resume=bool(args.resume))
    except runners.ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
