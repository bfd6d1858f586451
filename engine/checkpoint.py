"""Atomic checkpoints and exact resume.

`checkpoints/step_N/` holds the model (save_pretrained layout), `optimizer.pt`, `rng_state.pt` (every rank's),
`components.pt` (strategy and task state) and `trainer_state.json` (step, trainer state, the sha256 of every
other file and of its own content). It is written to `.tmp_step_N/` and renamed when complete; one that fails
its checksums is renamed `damaged_step_N`. Details: docs/engine.md, section engine/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from engine.distributed import barrier, broadcast, gather, is_sharded, rank_and_size
from engine.logprobs import unwrap_model

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
WHOLE_TO_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP2 shards -> whole tensors
WHOLE_TO_SHARDS = StateDictOptions(full_state_dict=True, strict=False)  # whole tensors -> each rank's shard


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message says why."""


def capture_rng_state(generator: torch.Generator | None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state() if generator is not None else None}
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


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer: torch.optim.Optimizer, scheduler,
                    generator: torch.Generator | None, trainer_state: dict, components: dict | None = None,
                    keep_last: int | None = None, name: str | None = None) -> Path:
    """Write `run_dir/checkpoints/<name>` (default `step_<step>`) atomically and return its path. Only `step_<int>`
    directories are resumable and pruned to `keep_last`; another name (e.g. "best") is kept as it is."""
    checkpoints = Path(run_dir) / "checkpoints"
    name = name or f"step_{step}"
    final = checkpoints / name
    weights, optimizer_state = None, None  # None: the model's and the optimizer's own state dicts
    if is_sharded(model):  # every rank sends its shards, rank 0 receives the whole tensors
        weights, optimizer_state = get_state_dict(model, optimizer, options=WHOLE_TO_RANK_0)
    rng_states = gather(capture_rng_state(generator))
    if rank_and_size()[0] != 0:
        barrier()  # until rank 0 has written it
        return final
    checkpoints.mkdir(parents=True, exist_ok=True)
    temporary = checkpoints / f".tmp_{name}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    unwrap_model(model).save_pretrained(temporary, state_dict=weights, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    torch.save({"optimizer": optimizer_state or optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               temporary / "optimizer.pt")
    torch.save(rng_states, temporary / "rng_state.pt")
    torch.save(components or {}, temporary / "components.pt")
    files = {path.name: _sha256(path) for path in sorted(temporary.iterdir())}
    record = {"step": step, **trainer_state, "files": files}
    record["state_sha256"] = _state_sha256(record)
    (temporary / "trainer_state.json").write_text(json.dumps(record, indent=2))
    _fsync_directory(temporary)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_directory(checkpoints)
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint whose files match their checksums (decided by rank 0). A damaged one is
    renamed `damaged_step_N`, with a warning naming its first damaged file, and the one before it is tried."""
    found = None
    for checkpoint in reversed(list_checkpoints(run_dir) if rank_and_size()[0] == 0 else []):
        damaged = damaged_file(checkpoint)
        if damaged is None:
            found = checkpoint
            break
        aside = checkpoint.with_name(f"damaged_{checkpoint.name}")
        shutil.rmtree(aside, ignore_errors=True)
        checkpoint.rename(aside)
        warn(f"warning: checkpoint {checkpoint} is damaged ({damaged}); moved to {aside.name}, trying the one before")
    return broadcast(found)


def damaged_file(checkpoint: Path) -> str | None:
    """The first file of `checkpoint` missing or differing from its sha256 in trainer_state.json (or
    trainer_state.json itself, unreadable or differing from its own recorded sha256); None if whole."""
    try:
        record = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json unreadable"
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or not isinstance(
            record.get("files"), dict):
        return "trainer_state.json is not a checkpoint's record"
    if "state_sha256" in record and record["state_sha256"] != _state_sha256(record):  # absent before it was kept
        return "trainer_state.json changed"
    for name, digest in record["files"].items():
        path = Path(checkpoint) / name
        if not path.is_file() or _sha256(path) != digest:
            return f"{name} missing or changed"
    return None


def load_checkpoint(checkpoint: Path, model, optimizer: torch.optim.Optimizer | None, scheduler,
                    generator: torch.Generator | None) -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and RNG states in place; return (trainer_state, components).
    With `optimizer` None only the weights are restored (the RNG states too only with a generator)."""
    from safetensors.torch import load_file

    checkpoint, sharded, wrapped = Path(checkpoint), is_sharded(model), model
    device = "cpu" if sharded else str(next(model.parameters()).device)
    weights = load_file(str(checkpoint / "model.safetensors"), device=device)
    model = unwrap_model(model)
    if sharded:  # each rank keeps its shard of the whole tensors
        missing, unexpected = set_model_state_dict(model, weights, options=WHOLE_TO_SHARDS)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights (lm_head = embed_tokens) are stored once; anything else missing is an error.
    tied = {name for name in missing if name.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {checkpoint} does not match the model: missing "
                              f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}; resume with the same "
                              "--model and config")
    if optimizer is not None:
        optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
        if sharded:
            set_optimizer_state_dict(wrapped, optimizer, optimizer_state["optimizer"], options=WHOLE_TO_SHARDS)
        else:
            optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    if generator is not None:
        states, (rank, size) = torch.load(checkpoint / "rng_state.pt", weights_only=False), rank_and_size()
        states = states if isinstance(states, list) else [states]  # one process's, before several were possible
        if len(states) != size:
            raise CheckpointError(f"checkpoint {checkpoint} was written by {len(states)} process(es), this run has "
                                  f"{size}: resume with torchrun --nproc_per_node {len(states)} (x nodes)")
        restore_rng_state(states[rank], generator)
    components = torch.load(checkpoint / "components.pt", map_location=str(next(model.parameters()).device),
                            weights_only=False)
    return json.loads((checkpoint / "trainer_state.json").read_text()), components


def _state_sha256(record: dict) -> str:
    """The sha256 of a trainer_state.json record's content, its own digest left out."""
    content = {key: value for key, value in record.items() if key != "state_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_directory(path: Path) -> None:
    """Make a directory's entries (a rename) durable, where the file system allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
