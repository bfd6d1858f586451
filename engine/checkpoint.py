"""Atomic checkpoints and exact resume.

A checkpoint `checkpoints/step_N/` holds everything the next step depends on:

    model.safetensors, config.json, tokenizer files   (save_pretrained layout: loadable by transformers)
    optimizer.pt         optimizer and LR-scheduler state
    rng_state.pt         python, numpy and torch RNG states, and the sampler's torch.Generator
    components.pt        the state of the strategy (its own parameters, e.g. a head, and any
                         other state, e.g. a curriculum) and of the task (e.g. an item table)
    trainer_state.json   step, prompt source, and anything else the trainer needs

It is first written to `checkpoints/.tmp_step_N/` and renamed to `step_N` only when
complete, so a crash mid-write never leaves a directory that looks complete. Only
directories named `step_<int>` count when looking for the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from engine.logprobs import unwrap_model

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


def capture_rng_state(generator: torch.Generator | None) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state() if generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    generator: torch.Generator | None,
    trainer_state: dict,
    components: dict | None = None,
    keep_last: int | None = None,
    name: str | None = None,
) -> Path:
    """Write `run_dir/checkpoints/<name>` (default `step_<step>`) atomically and return its path.

    Only `step_<int>` directories count as resumable checkpoints and are pruned to `keep_last`;
    another name (the best checkpoint on the validation split: "best") is kept as it is.
    """
    checkpoints = Path(run_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    name = name or f"step_{step}"
    final = checkpoints / name
    temporary = checkpoints / f".tmp_{name}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    unwrap_model(model).save_pretrained(temporary, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, temporary / "optimizer.pt")
    torch.save(capture_rng_state(generator), temporary / "rng_state.pt")
    torch.save(components or {}, temporary / "components.pt")
    (temporary / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    _fsync_directory(temporary)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_directory(checkpoints)
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(
    checkpoint: Path, model, optimizer: torch.optim.Optimizer | None, scheduler, generator: torch.Generator | None
) -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and RNG states in place; return (trainer_state, components).

    With `optimizer` None only the weights are restored (the RNG states too only with a generator).
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"), device=str(next(model.parameters()).device))
    model = unwrap_model(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights (lm_head = embed_tokens) are stored once; anything else missing is an error.
    tied = {name for name in missing if name.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not match the model: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}; resume with the same --model and config"
        )
    if optimizer is not None:
        optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    if generator is not None:
        restore_rng_state(torch.load(checkpoint / "rng_state.pt", weights_only=False), generator)
    components = torch.load(checkpoint / "components.pt", map_location=str(next(model.parameters()).device),
                            weights_only=False)
    return json.loads((checkpoint / "trainer_state.json").read_text()), components


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
