"""Run logging: `metrics.jsonl`, tensorboard scalars and sample texts, and a tqdm bar.

On resume `metrics.jsonl` is cut back to the rows written before the checkpoint, so it reads as if the run had
never stopped; only rank 0 writes. Details: docs/engine.md, section engine/logging.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, description: str = "train",
                 active: bool = True):
        self.run_dir, self.active = Path(run_dir), active
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, checkpoint_step=start_step)
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.progress = tqdm(total=total_steps, initial=start_step, desc=description, dynamic_ncols=True)

    def log_step(self, metrics: dict) -> None:
        """Append one step's metrics and update tensorboard and the progress bar."""
        if not self.active:
            return
        step = int(metrics["step"])
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_jsonable(metrics)) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(float(value)):
                self.writer.add_scalar(key, value, step)
        if not metrics.get("eval"):
            self.progress.update(1)
            self.progress.set_postfix(reward=_format(metrics.get("reward_mean"), ".3f"),
                                      kl=_format(metrics.get("kl"), ".4f"),
                                      tok_s=_format(metrics.get("tokens_per_s"), ".0f"))

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.active:  # Markdown in tensorboard: keep line breaks inside a code block.
            self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def message(self, text: str) -> None:
        if self.active:
            self.progress.write(text)

    def close(self) -> None:
        if not self.active:
            return
        self.progress.close()
        self.writer.flush()
        self.writer.close()


def truncate_metrics(path: Path, checkpoint_step: int) -> None:
    """Keep the rows written before the checkpoint of `checkpoint_step` (0: no checkpoint, keep none)."""
    if not path.exists():
        return
    kept = [json.dumps(row) for row in read_metrics(path) if row.get("step", 0) < checkpoint_step or (
        row.get("step") == checkpoint_step > 0 and row.get("split") != "test")]
    temporary = path.with_suffix(".jsonl.tmp")  # a crash while cutting keeps the old file
    temporary.write_text("".join(line + "\n" for line in kept))
    temporary.replace(path)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not JSON (torn by a crash) is dropped with a warning."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            rows.extend([json.loads(line)] if line.strip() else [])
        except ValueError:
            print(f"warning: {path} line {number} is not JSON (torn by a crash?): dropped: {line[:80]!r}")
    return rows


def _format(value, spec: str) -> str:
    """A number for the progress bar; "-" for a metric the step does not have (a skipped step's reward is None)."""
    return "-" if value is None else format(value, spec)


def _jsonable(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
        else:
            out[key] = value
    return out
