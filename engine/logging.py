"""Run logging: `metrics.jsonl`, tensorboard scalars and sample texts, and a tqdm bar.

`metrics.jsonl` has one JSON object per step (plus eval rows tagged `"eval": true`).
On resume the file is cut back to the checkpoint's step first, so a resumed run's
file reads as if it had never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, description: str = "train"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        truncate_metrics(self.metrics_path, after_step=start_step)
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.progress = tqdm(total=total_steps, initial=start_step, desc=description, dynamic_ncols=True)

    def log_step(self, metrics: dict) -> None:
        """Append one step's metrics and update tensorboard and the progress bar."""
        step = int(metrics["step"])
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_jsonable(metrics)) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(float(value)):
                self.writer.add_scalar(key, value, step)
        if not metrics.get("eval"):
            self.progress.update(1)
            self.progress.set_postfix(
                reward=f"{metrics.get('reward_mean', float('nan')):.3f}",
                kl=f"{metrics.get('kl', 0.0):.4f}",
                tok_s=f"{metrics.get('tokens_per_s', 0.0):.0f}",
            )

    def log_text(self, tag: str, text: str, step: int) -> None:
        # Markdown in tensorboard: keep line breaks inside a code block.
        self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def message(self, text: str) -> None:
        self.progress.write(text)

    def close(self) -> None:
        self.progress.close()
        self.writer.flush()
        self.writer.close()


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows with step > after_step (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if line.strip() and json.loads(line).get("step", 0) <= after_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _jsonable(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
        else:
            out[key] = value
    return out
