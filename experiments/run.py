"""`python -m experiments.run NAME [options]`: run a named experiment.

    python -m experiments.run --list
    python -m experiments.run grpo_sort --quick
    python -m experiments.run rank_grpo_reddit --set learner.lr=1e-5 --set max_steps=400
    python -m experiments.run rank_grpo_reddit --show-config
    python -m experiments.run grpo_sort --resume runs/grpo_sort-20261125-101500-12345

    torchrun --nproc_per_node 4 -m experiments.run grpo_sort --set trainer.distributed=fsdp2

Options: --out DIR, --data-dir DIR, --model PATH_OR_ID, --device cpu|cuda, --quick,
--resume DIR, --set key=value (repeatable; keys in experiments/config.py), --show-config.
Every setting is checked before any data is read or any model is built; bad input exits
with code 2 and one line saying what is wrong.

Nothing is lost. The run directory is locked (an exclusive `flock` on DIR/.lock) before
any work, and so is an SFT cache entry while it is being written: a second run that wants
either exits 2 at once, naming the holder (pid, host, start time). Default run
directories are unique (created atomically); a new run that fails before recording anything
but its config.json leaves no run directory behind (or an empty one, for an --out folder that
existed), so the same command can be run again once the cause is fixed. A local --model
folder is checked (its config.json, that it has weights and that their headers read, its
tokenizer) before any work. Ctrl-C (SIGINT) or SIGTERM
ends the RL loop after the current step with a checkpoint and exit code 130 (143); a
second Ctrl-C exits at once. A run that learned nothing usable (an SFT loss that turned NaN,
a policy whose logits stay NaN, or no RL step that changed the weights) exits 1 with one
line saying why, never 0. Under torchrun only rank 0 writes files and runs the SFT
stage; the other ranks wait for it.

The pipeline of an experiment of kind "rl": build the task (data) -> the policy (a
checkpoint, or a tiny model and a tokenizer trained on the task's text) -> an SFT warm start
(cached per configuration and data) -> the strategy, the learner and the trainer
(engine/trainer.py), which runs the RL loop and writes the run directory.

Besides engine.trainer.Task, a task may define three optional steps of this pipeline:
`prepare_policy(model, tokenizer)` (after a policy is built or loaded: e.g. add tokens;
must be idempotent), `warm_start(model, tokenizer, config) -> history` (its own SFT stage
instead of behaviour cloning on `demonstrations()`), and `bind(model, tokenizer)` (before
RL and evaluation: tasks whose rewards or metrics need the policy itself, e.g. to encode
an item table).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import distributed
from engine.checkpoint import list_checkpoints
from engine.config import first_line
from engine.host_memory import retain_freed_memory
from experiments.config import (
    RESUMABLE_CHANGES,
    ExperimentConfig,
    UsageError,
    apply,
    apply_command_line,
    check_tree,
    default_tree,
    describe,
    leaves,
    to_dict,
)
from experiments.registry import EXPERIMENTS, TASKS, experiment_names
from experiments.warm_start import hold_lock, sft_progress


class ExperimentError(Exception):
    """A problem with the experiment's inputs (data, model); reported in one line with exit code 2."""


# ---------------------------------------------------------------------------
# the configuration
# ---------------------------------------------------------------------------


def new_config(name: str, quick: bool, assignments: list[str]) -> ExperimentConfig:
    """The registry entry's configuration, with --quick and --set applied."""
    experiment = EXPERIMENTS[name]
    algorithm = experiment.algorithm
    for assignment in assignments:  # a new algorithm changes the strategy section and its defaults
        key, _, text = assignment.partition("=")
        if key.strip() == "algorithm":
            algorithm = text.strip()
    config = default_tree(name, experiment.kind, experiment.task_type, algorithm, TASKS[experiment.task_type].config)
    config = apply(config, {**experiment.settings, **(experiment.quick if quick else {})})
    return apply_command_line(config, [a for a in assignments if a.partition("=")[0].strip() != "algorithm"])


def stored_config(record: dict) -> ExperimentConfig:
    """The configuration a run directory's config.json recorded."""
    tree = record["config"]
    config = default_tree(tree["name"], tree["kind"], tree["task_type"], tree["algorithm"],
                          TASKS[tree["task_type"]].config)
    flat = {key: value for key, value in _flatten(tree).items() if key not in ("name", "kind", "task_type")}
    return apply(config, flat)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resolve_config(args: argparse.Namespace) -> tuple[ExperimentConfig, dict]:
    """(configuration, changes made on resume) from the command line; nothing is read but config.json."""
    assignments = list(args.set)
    if args.model:
        assignments.append(f"model.path={args.model}")
    if args.device:
        assignments.append(f"device={args.device}")
    changes = {}
    if args.resume:
        for flag in ("out", "quick"):  # the run's own directory and settings, which were set when it started
            if getattr(args, flag):
                raise UsageError(f"--resume continues {args.resume} in place with its own settings; drop --{flag}")
        path = Path(args.resume) / "config.json"
        if not path.exists():
            raise UsageError(f"--resume {args.resume}: no config.json there; pass the run directory of an earlier run")
        try:
            stored = stored_config(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as error:  # a config.json that is not one recrl wrote
            raise UsageError(f"--resume {args.resume}: config.json is damaged or not a recrl run's ({error!r}); "
                             "start a new run") from None
        except UsageError as error:  # edited by hand, or written by a recrl whose checks were looser
            raise UsageError(f"--resume {args.resume}: config.json holds a value this recrl refuses ({error}); "
                             "correct it there, or start a new run") from None
        if stored.name != args.name:
            raise UsageError(f"--resume {args.resume} is a run of {stored.name!r}, not {args.name!r}")
        if any(a.partition("=")[0].strip() == "algorithm" for a in assignments):
            raise UsageError("--resume: the algorithm of a run cannot change; start a new run")
        config = apply_command_line(stored, assignments)
        before, after = leaves(stored), leaves(config)
        changes = {key: [before[key][1], after[key][1]] for key in after if after[key][1] != before[key][1]}
        newest = list_checkpoints(Path(args.resume))
        reached = int(newest[-1].name.removeprefix("step_")) if newest else 0
        if config.trainer.max_steps < reached:
            raise UsageError(f"trainer.max_steps={config.trainer.max_steps}: the run's newest checkpoint is at step "
                             f"{reached}, and a resumed run cannot go back; set max_steps >= {reached}")
        refused = sorted(set(changes) - set(RESUMABLE_CHANGES))
        if refused:
            key = refused[0]
            raise UsageError(f"--resume: {key} was {changes[key][0]!r} in that run, {changes[key][1]!r} now; a resumed "
                             f"run keeps its settings except {', '.join(RESUMABLE_CHANGES)} (start a new run instead)")
    else:
        config = new_config(args.name, args.quick, assignments)
    check_tree(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda: no CUDA device is available here; use --device cpu")
    check_model_folder(config.model.path)
    return config, changes


def check_model_folder(path: str | None) -> None:
    """A local model.path (--model) must hold a config.json transformers knows, weights files whose headers
    read, and a tokenizer RL can use."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoTokenizer

    from models.loader import ModelLoadError, check_tokenizer

    if path is None or not os.path.isdir(path):
        if path is not None and (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise UsageError(f"model.path {path}: no such folder, and not a hub id (owner/name)")
        return  # a hub id: checked when it is loaded
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"model.path {path}: no config.json there; pass a folder written by "
                         "model.save_pretrained(...)")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:  # e.g. a model_type this transformers does not know
        raise UsageError(f"model.path {path}: its config.json does not load ({first_line(error)})") from None
    if not any(Path(path).glob("*.safetensors")) and not any(Path(path).glob("pytorch_model*.bin")):
        raise UsageError(f"model.path {path}: no weights there (*.safetensors or pytorch_model*.bin); save the model "
                         "with model.save_pretrained(...)")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(path) / name).exists() for name in tokenizer_files):
        raise UsageError(f"model.path {path}: no tokenizer there ({', '.join(tokenizer_files)}); save the model's "
                         "tokenizer into the folder with tokenizer.save_pretrained(...)")
    for weights in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UsageError(f"model.path {path}: {weights.name} is not a readable safetensors file ({error}); "
                             "save the model again with save_pretrained(...)") from None
    try:
        check_tokenizer(AutoTokenizer.from_pretrained(path), path)
    except (ModelLoadError, OSError, ValueError) as error:
        raise UsageError(f"model.path {path}: {error}") from None


def describe_environment() -> dict:
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # CPU results depend on it: another thread count sums in another order (README, RecPO)
        "cpu_threads": torch.get_num_threads(),
    }


def write_config(run_dir: Path, config: ExperimentConfig, extra: dict, changes: dict | None = None,
                 environment: dict | None = None) -> None:
    """config.json: the resolved tree, the environment (with `environment`'s facts), the command and `extra`
    (merged into what is there); a resume appends its changes. Written before any work, completed as the stages
    learn more."""
    from engine.trainer import atomic_write_json

    path = run_dir / "config.json"
    record = (json.loads(path.read_text()) if path.exists()
              else {"environment": {**describe_environment(), **(environment or {})}, "command": sys.argv})
    record.update(extra, config=to_dict(config))
    if changes is not None:
        record.setdefault("resumes", []).append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
                                                 "changes": changes})
    atomic_write_json(path, json.loads(json.dumps(record, default=str)))


# ---------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_task(config: ExperimentConfig, data_dir: str | None):
    """(task, tokenizer corpus, data source, data fingerprint), from the task type's builder."""
    from experiments.data import DataError

    try:
        return TASKS[config.task_type].build(config, data_dir)
    except (DataError, ValueError) as error:
        raise ExperimentError(str(error)) from error


def build_policy(config: ExperimentConfig, task, corpus: list[str], source: str | None = None):
    """(model, tokenizer): `source` or `model.path` when given, else a tiny model + a tokenizer trained on
    `corpus`; then the task's `prepare_policy`, if it has one."""
    from experiments.data.common import cache_dir
    from models.loader import ModelLoadError, load_model_and_tokenizer
    from models.tiny import build_tiny_model, train_tokenizer

    source = source or config.model.path
    if source:
        try:
            model, tokenizer = load_model_and_tokenizer(source, device=config.device)
        except ModelLoadError as error:
            cached = Path(source).resolve().is_relative_to(cache_dir().resolve())
            raise ExperimentError(f"{error}" + (f"; it is a cached warm start: delete {source} and run again to "
                                                "retrain it" if cached else "")) from error
    else:
        tokenizer = train_tokenizer(corpus, vocab_size=config.model.vocab_size)
        model = build_tiny_model(config.model.tiny, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, seed=config.seed)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model = model.to(config.device)
    if hasattr(task, "prepare_policy"):
        task.prepare_policy(model, tokenizer)
    return model, tokenizer


def sft_cache_dir(config: ExperimentConfig, data_fingerprint: str) -> Path:
    """$RECRL_CACHE_DIR (default ~/.cache/recrl)/sft/<hash of everything the SFT checkpoint depends on>."""
    from experiments.data.common import cache_dir

    identity = {"sft": dataclasses.asdict(config.sft), "model": dataclasses.asdict(config.model),
                "task": dataclasses.asdict(config.task), "task_type": config.task_type, "seed": config.seed,
                "max_prompt_length": config.trainer.max_prompt_length,
                "max_new_tokens": config.sampling.max_new_tokens, "data": data_fingerprint}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "sft" / f"{config.task_type}-{digest}"


def run_sft_stage(config: ExperimentConfig, task, corpus: list[str], data_fingerprint: str) -> Path:
    """Supervised warm start, cached per configuration: returns a save_pretrained folder to start RL from."""
    folder = sft_cache_dir(config, data_fingerprint)
    if (folder / "config.json").exists():
        print(f"SFT: reusing cached checkpoint {folder}")
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(folder.with_name(f"{folder.name}.lock"), f"the SFT cache entry {folder}"):
        if not (folder / "config.json").exists():  # unless a run that held the lock has just written it
            for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # left by a run that was killed
                shutil.rmtree(stale, ignore_errors=True)
            start = time.perf_counter()
            write_sft_checkpoint(config, task, corpus, folder)
            (folder / "sft_time.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))  # bench breakdown
    return folder


def write_sft_checkpoint(config: ExperimentConfig, task, corpus: list[str], folder: Path) -> None:
    """Train the SFT warm start and write it to `folder` atomically (a temporary folder, then a rename)."""
    from engine.sft import supervised_finetune

    seed_everything(config.seed)
    model, tokenizer = build_policy(config, task, corpus)
    if hasattr(task, "warm_start"):
        try:
            history = task.warm_start(model, tokenizer, config)
        except ValueError as error:  # the task's own check of its data against the settings, with its fix
            raise ExperimentError(str(error)) from error
    else:
        chats, completions = task.demonstrations()
        print(f"SFT: {config.sft.steps} steps on {len(chats)} demonstrations")
        history = supervised_finetune(model, tokenizer, chats, completions, config.sft, seed=config.seed,
                                      max_prompt_length=config.trainer.max_prompt_length,
                                      max_completion_length=config.sampling.max_new_tokens,
                                      on_step=sft_progress(config.sft.steps, "sft"))
    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    (temporary / "sft_history.json").write_text(json.dumps(history))
    temporary.rename(folder)


def run_rl(config: ExperimentConfig, run_dir: Path, task, corpus: list[str], resume: bool,
           initial_model: str | None, initial_stage_name: str, extra_record: dict) -> dict[str, float]:
    """RL on `task` from `initial_model` (or the configured model); returns the final evaluation."""
    from algorithms.registry import strategy_class
    from engine.learner import Learner
    from engine.trainer import Trainer
    from fastdecode import fast_decoder, unsupported_reason
    from models.loader import enable_activation_checkpointing

    seed_everything(config.seed)
    model, tokenizer = build_policy(config, task, corpus, initial_model)
    reference_model = copy.deepcopy(model) if config.learner.kl_coef > 0 else None
    if hasattr(task, "bind"):
        task.bind(model, tokenizer)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    strategy = strategy_class(config.algorithm)(config.strategy, tokenizer=tokenizer, task=task)
    if distributed.rank_and_size()[1] > 1:
        if list(strategy.parameters()) and config.trainer.distributed == "fsdp2":
            raise ExperimentError(f"{config.algorithm} trains parameters of its own, which FSDP2 does not shard: "
                                  "use --set trainer.distributed=ddp (the learner averages their gradients)")
        if config.trainer.distributed == "fsdp2" and unsupported_reason(model):
            raise ExperimentError(f"trainer.distributed=fsdp2 samples with the fast decoder, which cannot run this "
                                  f"model ({unsupported_reason(model)}): use trainer.distributed=ddp")
        model = distributed.wrap(model, config.trainer.distributed)
    learner_config = dataclasses.replace(config.learner, loss_max_length=config.learner.loss_max_length
                                         or config.sampling.max_new_tokens)  # Dr. GRPO's constant L_max
    steps = config.trainer.max_steps * config.learner.ppo_epochs * config.learner.mini_batches
    learner = Learner(model, learner_config, strategy, reference_model=reference_model, total_optimizer_steps=steps)
    trainer = Trainer(model, tokenizer, task, strategy, learner, config.trainer, config.sampling, run_dir,
                      seed=config.seed, stage_name=config.algorithm, initial_stage_name=initial_stage_name,
                      make_decoder=fast_decoder)
    write_config(run_dir, config, {"initial_model": initial_model or config.model.path or "tiny (random init)",
                                   **extra_record})
    if resume:
        print(f"resuming {config.name} from step {trainer.resume(run_dir)}")
    with stop_after_the_step_on_signals(trainer):
        return trainer.train()


@contextlib.contextmanager
def stop_after_the_step_on_signals(trainer):
    """Ctrl-C (SIGINT) or SIGTERM: the trainer finishes its step, writes a checkpoint and raises
    TrainingInterrupted. A second signal (more than a second later: torchrun passes the first one on to its
    workers) exits at once."""
    first = []

    def request_stop(number, frame):
        if first and time.monotonic() - first[0] > 1.0:
            raise KeyboardInterrupt
        if not first:
            first.append(time.monotonic())
            trainer.stop_requested = number
            print(f"\n{signal.Signals(number).name}: stopping after step {trainer.step + 1} with a checkpoint "
                  "(press Ctrl-C again to exit at once)", file=sys.stderr)

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_sft_only(config: ExperimentConfig, run_dir: Path, task, corpus: list[str], data_source: str,
                 fingerprint: str) -> dict:
    """SFT (cached) and its evaluation on the test split, as stage "sft" of eval.json."""
    from engine.trainer import completion_stop_ids, greedy_generate, write_eval
    from fastdecode import fast_decoder

    folder = run_sft_stage(config, task, corpus, fingerprint)
    write_config(run_dir, config, {"data_source": data_source, "sft_checkpoint": str(folder)})
    model, tokenizer = build_policy(config, task, corpus, str(folder))
    if hasattr(task, "bind"):
        task.bind(model, tokenizer)
    stop_ids = completion_stop_ids(task, tokenizer, model)
    results = task.evaluate(lambda chats, prompt_indices=None, logits_hook=None: greedy_generate(
        model, tokenizer, chats, config.sampling.max_new_tokens, config.trainer.max_prompt_length,
        config.trainer.eval_batch_size, stop_ids, fast_decoder, prompt_indices, logits_hook))
    write_eval(run_dir, "sft", results)
    return results


def recorded_initial_model(run_dir: Path) -> str | None:
    """The warm-start folder a run being resumed started from, when it still exists: the resumed run continues
    from the same reference model even if the warm-start cache key has changed since (None: train or find it)."""
    recorded = json.loads((run_dir / "config.json").read_text()).get("initial_model")
    if recorded and (Path(recorded) / "config.json").is_file():
        return recorded
    if recorded:  # None: the run stopped before its warm start was recorded, so there is nothing to miss
        print(f"warning: the warm start this run started from ({recorded}) is gone; using the SFT cache entry of "
              "the current settings (trained again if missing)")
    return None


def run_experiment(config: ExperimentConfig, run_dir: Path, data_dir: str | None, resume: bool) -> None:
    if config.kind == "baselines":
        from experiments.baselines import run_baselines
        from experiments.data import DataError

        write_config(run_dir, config, {"data_source": "movielens-100k"})
        try:
            run_baselines(run_dir, data_dir=data_dir, list_length=config.task.list_length or 20)
        except DataError as error:
            raise ExperimentError(str(error)) from error
        return
    task, corpus, data_source, fingerprint = build_task(config, data_dir)
    if config.kind == "sft":
        final = run_sft_only(config, run_dir, task, corpus, data_source, fingerprint)
        print("sft eval: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
        return
    initial_model = None
    if config.sft.steps > 0:  # rank 0 trains or finds the warm start (a resumed run: its own); the others wait
        if distributed.rank_and_size()[0] == 0:
            initial_model = (recorded_initial_model(run_dir) if resume else None) or str(
                run_sft_stage(config, task, corpus, fingerprint))
        initial_model = distributed.broadcast(initial_model)
    final = run_rl(config, run_dir, task, corpus, resume, initial_model,
                   "sft" if initial_model else "initial", {"data_source": data_source})
    print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (reported as one line, exit code 2) instead of printing usage."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="experiment name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--show-config", action="store_true", help="print every config key with its value and exit")
    parser.add_argument("--out", help="run directory (default runs/NAME-TIMESTAMP-PID)")
    parser.add_argument("--data-dir", help="data folder (else $RECRL_DATA_DIR, else ~/.cache/recrl)")
    parser.add_argument("--model", help="local checkpoint folder or hub id (default: a tiny model built here)")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a small version that finishes in minutes on 2 CPU cores")
    parser.add_argument("--resume", help="continue the run in this directory from its newest checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return parser


@contextlib.contextmanager
def claimed_run_directory(args: argparse.Namespace, config: ExperimentConfig):
    """The run directory, created if new and locked before any work; the lock is held until the run ends.
    Rank 0 claims it; the other ranks of a torchrun get its path, or rank 0's refusal."""
    with contextlib.ExitStack() as stack:
        claimed = None
        if distributed.rank_and_size()[0] == 0:
            try:
                claimed = stack.enter_context(claim_run_directory(args, config))
            except UsageError as error:
                claimed = error
        claimed = distributed.broadcast(claimed)
        if isinstance(claimed, UsageError):
            raise claimed
        yield Path(claimed)


@contextlib.contextmanager
def claim_run_directory(args: argparse.Namespace, config: ExperimentConfig):
    run_dir = Path(args.resume or args.out or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    created = not run_dir.exists()  # this run makes the folder (always so for a default one)
    if not (args.resume or args.out):  # unique even when runs start in the same second: mkdir is atomic
        default = run_dir
        for attempt in range(2, 1000):
            try:
                run_dir.mkdir(parents=True)
                break
            except FileExistsError:
                run_dir = default.with_name(f"{default.name}-{attempt}")

    def refuse_unless_empty():
        if not args.resume and any(path.name != ".lock" and path.suffix != ".tmp" for path in run_dir.iterdir()):
            raise UsageError(f"--out {run_dir} is not empty; choose a new directory or --resume it")

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {run_dir}: cannot create it ({error.strerror}); choose another directory") from None
    if not os.access(run_dir, os.W_OK):
        raise UsageError(f"--out {run_dir} is not writable; choose a writable directory")
    lock_existed = (run_dir / ".lock").exists()
    with hold_lock(run_dir / ".lock", f"the run directory {run_dir}"):  # first, so that a holder is named
        try:
            refuse_unless_empty()
        except UsageError:
            if not lock_existed:  # leave a folder that is not ours as it was
                (run_dir / ".lock").unlink(missing_ok=True)
            raise
        try:
            yield run_dir
        except Exception:  # not on Ctrl-C, whose message points at --resume
            # A new run that failed before recording anything but its config (bad data, a model that does not
            # load, a busy SFT cache entry) leaves nothing behind, so the same command can simply be run again.
            if not args.resume and {path.name for path in run_dir.iterdir()} <= {"config.json", ".lock"}:
                for name in ("config.json", ".lock"):
                    (run_dir / name).unlink(missing_ok=True)
                if created:
                    with contextlib.suppress(OSError):  # another run may have claimed it meanwhile
                        run_dir.rmdir()
            raise


def main(argv: list[str] | None = None) -> int:
    from engine.checkpoint import CheckpointError
    from engine.learner import TrainingFailed
    from engine.trainer import TrainingInterrupted

    run_dir, finished = None, False
    try:
        args = build_parser().parse_args(argv)
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
        config, changes = resolve_config(args)
        if args.data_dir and not TASKS[config.task_type].reads_data:
            raise UsageError(f"--data-dir: {config.name} builds its own examples and reads no data; drop --data-dir")
        if args.show_config:
            print(describe(config, default_tree(config.name, config.kind, config.task_type, config.algorithm,
                                                TASKS[config.task_type].config)))
            return 0
        distributed.start(config.device)
        rank, processes = distributed.rank_and_size()
        if rank > 0:
            sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run (errors still reach stderr)
        if processes > 1 and (config.kind != "rl" or config.trainer.prompts_per_step % processes):
            raise UsageError(f"{processes} processes: only RL experiments run under torchrun, and "
                             f"trainer.prompts_per_step ({config.trainer.prompts_per_step}) must be a multiple of "
                             "the number of processes")
        rows_per_process = config.trainer.prompts_per_step * config.trainer.group_size // processes
        if processes > 1 and config.learner.mini_batches > rows_per_process:  # each rank splits its own rows
            raise UsageError(f"learner.mini_batches={config.learner.mini_batches}: must be <= the rows of a step on "
                             f"each of the {processes} processes ({rows_per_process})")
        retained = retain_freed_memory()  # CPU steps reuse freed memory instead of faulting it in anew
        with claimed_run_directory(args, config) as run_dir:
            write_config(run_dir, config, {}, changes if args.resume else None,
                         environment={"freed_host_memory_retained": retained})
            run_experiment(config, run_dir, data_dir=args.data_dir, resume=bool(args.resume))
        finished = True
    except (UsageError, ExperimentError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:  # the run learned nothing usable: never a success
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        checkpoint, number = stop.args
        print(f"stopped by {signal.Signals(number).name}: checkpoint {checkpoint} written; continue with "
              f"--resume {run_dir}", file=sys.stderr)
        return 128 + number
    except KeyboardInterrupt:
        print(f"interrupted{'' if run_dir is None else f'; continue from the last checkpoint with --resume {run_dir}'}",
              file=sys.stderr)
        return 130
    finally:
        distributed.stop(finished)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
