"""What a finished (or stopped) run directory says, for the results tables of the tasks and the study.

The trainer writes `selection.json` (engine/trainer.py: the validation metric, the best step and the
validation history that chose `checkpoints/best`); runs from before that file kept the same object as
eval.json's "selection" entry. `metrics.jsonl` is read with engine.logging.read_metrics.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_selection(run_dir: Path) -> dict:
    """The trainer's validation choice of `run_dir`: selection.json, else eval.json's "selection" entry, else {}."""
    path = Path(run_dir) / "selection.json"
    if path.exists():
        return json.loads(path.read_text())
    return json.loads((Path(run_dir) / "eval.json").read_text()).get("selection", {})
