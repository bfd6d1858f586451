"""Cached warm-start stages: trained once, reused by every run that would train the same weights.

A stage (the SFT of `experiments/run.py`, RecPO's stage 1, ReRec's demonstrations, GR2's
mid-training and SFT) is named by everything its weights depend on, a JSON-able `identity`
(the model and SFT settings, lengths, seed, the data fingerprint, the task fields the stage
reads), and lives in `$RECRL_CACHE_DIR/sft/<name>-<first 16 hex of sha256(identity)>/`
(default `~/.cache/recrl`). While a run trains an entry it holds the entry's lock (a second run
that needs the same entry exits 2 at once, naming the holder; finished entries are read without
the lock); the entry is written to a temporary folder and renamed, so no killed run leaves half
an entry, and a temporary folder left by one is removed; a finished entry that no longer loads
(damaged on disk) stops the run with one line naming the folder to delete. Warm starts run on
rank 0 only (experiments/run.py), so the lock is never contended by the ranks of one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from engine.config import first_line
from experiments.config import UsageError


@contextlib.contextmanager
def hold_lock(path: Path, what: str):
    """Hold an exclusive lock on the file `path` (the kernel drops it when the process ends, even on kill -9);
    when another process holds it, a UsageError naming that process (pid, host, start time)."""
    try:
        handle = open(path, "a+")
    except OSError as error:  # e.g. a folder of that name
        raise UsageError(f"cannot lock {what}: {path} cannot be opened as a lock file ({error.strerror}); it must "
                         "be a file in a writable folder") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UsageError(f"{what} is in use by {handle.read().strip() or 'another process'}; wait for that run "
                             "to finish or stop it") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield


def stage_folder(name: str, identity: dict) -> Path:
    """The cache entry of the stage `name` with this `identity`."""
    from experiments.data.common import cache_dir

    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "sft" / f"{name}-{digest}"


def cached_stage(model, name: str, identity: dict, train: Callable[[], list[dict]]) -> list[dict]:
    """Load the stage's cached weights into `model`, or run `train()` (which trains `model` in place and returns
    its history) and cache the result; returns the history either way."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, save_model

    from engine.logprobs import unwrap_model

    folder = stage_folder(name, identity)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not (folder / "history.json").exists():  # a finished entry never changes: read it without the lock
        with hold_lock(folder.with_name(f"{folder.name}.lock"), f"the warm-start cache entry {folder}"):
            if not (folder / "history.json").exists():  # unless a run that held the lock has just written it
                for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # left by a run that was killed
                    shutil.rmtree(stale, ignore_errors=True)
                history = train()
                temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
                temporary.mkdir()
                save_model(unwrap_model(model), str(temporary / "model.safetensors"))
                (temporary / "history.json").write_text(json.dumps(history))
                temporary.rename(folder)
                return history
    print(f"{name}: reusing the cached warm start {folder}")
    try:
        load_model(unwrap_model(model), str(folder / "model.safetensors"))
        return json.loads((folder / "history.json").read_text())
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:  # damaged on disk since it was written
        raise UsageError(f"the cached warm start {folder} is damaged ({first_line(error)}); delete that "
                         "folder and run again to retrain it") from None


def sft_progress(steps: int, description: str) -> Callable[[dict], None]:
    """An `on_step` callback for engine.sft.supervised_finetune: a tqdm bar with the loss."""
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=description, dynamic_ncols=True)

    def on_step(metrics: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['sft_loss']:.3f}")
        if bar.n >= steps:
            bar.close()

    return on_step
