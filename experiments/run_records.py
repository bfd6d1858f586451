"""What a finished (or stopped) run directory says, for the results tables of the tasks and the study.

The trainer writes `selection.json` (engine/trainer.py: the validation metric, the best step and the
validation history that chose `checkpoints/best`); runs from before that file kept the same object as
eval.json's "selection" entry. `metrics.jsonl` is read with engine.logging.read_metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_selection(run_dir: Path) -> dict:
    """The trainer's validation choice of `run_dir`: selection.json, else eval.json's "selection" entry, else {}."""
    path = Path(run_dir) / "selection.json"
    if path.exists():
        return json.loads(path.read_text())
    return json.loads((Path(run_dir) / "eval.json").read_text()).get("selection", {})


def table_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line the task tables share: `NAME=RUN_DIR_OR_MODEL_FOLDER ...`, the run whose config.json
    defines the task, the data folder, the output JSON and the bootstrap resamples (a task adds its own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("rows", nargs="+", metavar="NAME=RUN_DIR_OR_MODEL_FOLDER")
    parser.add_argument("--reference-run", required=True, help="a run directory whose config.json defines the task")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resamples", type=int, default=10_000)
    return parser


def named_rows(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=PATH` arguments as (name, path) pairs, in order."""
    return [(spec.partition("=")[0], Path(spec.partition("=")[2])) for spec in specs]
