"""Reliability: no lost runs, no silent wrong settings (README, Reliability).

- locks: a run directory or an SFT cache entry in use makes a second run exit 2 at once, naming
  the holder; default run directories are unique; SFT cache entries are written atomically;
- damaged files: a damaged newest checkpoint makes --resume fall back to the one before (with a
  warning naming the file) and end as the uninterrupted run did; a torn metrics line is dropped
  with a warning; resuming a finished run, or one killed before its first checkpoint, adds no row;
- Ctrl-C: the step finishes, a checkpoint is written, exit 130 with one line; a second Ctrl-C
  exits at once;
- NaN logits (in the sampler's or the learner's log-probs): the step is skipped, weights unchanged;
- bad input (an unwritable --out, a --model folder with garbage weights or no tokenizer, a corrupt
  config.json): exit 2 with one line before any work; config fuzzing: an invalid value for every
  key of several experiments does the same and creates no run directory;
- the fault suite (slow): SIGKILL at >= 10 random moments, checkpoint and cache writes included;
  after each the run is resumed, and it ends with the uninterrupted run's metrics and weights.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import types
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.checkpoint import list_checkpoints
from engine.learner import Learner, LearnerConfig, TrainingFailed
from engine.logging import read_metrics, truncate_metrics
from engine.rollout import SamplingConfig
from engine.trainer import Trainer, TrainerConfig
from experiments import run
from experiments.config import leaves, to_dict
from tests.conftest import CORPUS, make_model

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("time_rollout_s", "time_reward_s", "time_learn_s", "tokens_per_s", "time_eval_s")
TINY = ["--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "num_layers=1",
        "--set", "prompts_per_step=2", "--set", "group_size=4", "--set", "task.train_size=64",
        "--set", "task.eval_size=8", "--set", "sft.steps=0", "--set", "max_new_tokens=8"]
STRAIGHT = ["grpo_sort", *TINY, "--set", "max_steps=3", "--set", "save_every=1", "--set", "eval_every=2"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))


def _without_timings(rows):
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in rows]


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def _same_run(directory: Path, reference: Path) -> None:
    """`directory` ended as `reference`: metrics (but timings), evaluations, selection, final and best weights."""
    assert _without_timings(read_metrics(directory / "metrics.jsonl")) == _without_timings(
        read_metrics(reference / "metrics.jsonl"))
    for name in ("eval.json", "selection.json"):
        assert json.loads((directory / name).read_text()) == json.loads((reference / name).read_text()), name
    for checkpoint in (list_checkpoints(reference)[-1].name, "best"):
        expected = _weights(reference / "checkpoints" / checkpoint)
        for name, tensor in _weights(directory / "checkpoints" / checkpoint).items():
            assert torch.equal(tensor, expected[name]), (checkpoint, name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished tiny run: 3 steps, a checkpoint after each, validation at steps 0, 2 and 3."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECRL_CACHE_DIR", str(out.parent / "cache"))
        assert run.main([*STRAIGHT, "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------
# locks and unique directories
# ---------------------------------------------------------------------------


def test_a_run_directory_in_use_makes_a_second_run_exit_2_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from experiments.run import hold_lock\n"
                               "with hold_lock(__import__('pathlib').Path(sys.argv[1]), 'x'):\n"
                               "    print('held', flush=True); time.sleep(120)", str(out / ".lock")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert run.main([*STRAIGHT, "--out", str(out)]) == 2
        assert time.monotonic() - started < 30  # at once, not after waiting for the lock
    finally:
        holder.kill()
        holder.wait()
    error = capsys.readouterr().err
    assert f"the run directory {out} is in use by pid {holder.pid} on {socket.gethostname()} since " in error
    assert error.count("\n") == 1
    assert [path.name for path in out.iterdir()] == [".lock"]  # nothing else was written
    assert run.main([*STRAIGHT, "--set", "max_steps=1", "--out", str(out)]) == 0  # the lock died with its holder


def test_an_sft_cache_entry_in_use_makes_a_second_run_exit_2(tmp_path, capsys):
    arguments = ["grpo_sort", *TINY, "--set", "sft.steps=2", "--set", "max_steps=1"]
    config = run.new_config("grpo_sort", False, arguments[2::2])
    _, _, _, fingerprint = run.build_task(config, None)
    entry = run.sft_cache_dir(config, fingerprint)
    entry.parent.mkdir(parents=True)
    with run.hold_lock(entry.with_name(f"{entry.name}.lock"), "test"):
        assert run.main([*arguments, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert f"the SFT cache entry {entry} is in use by pid {os.getpid()} on " in error and error.count("\n") == 1
    assert not entry.exists()
    assert not (tmp_path / "run").exists()  # the run recorded nothing: its folder is gone, the command can be rerun
    (tmp_path / "given").mkdir()
    with run.hold_lock(entry.with_name(f"{entry.name}.lock"), "test"):
        assert run.main([*arguments, "--out", str(tmp_path / "given")]) == 2
    assert list((tmp_path / "given").iterdir()) == []  # a folder the user made is kept, emptied
    assert run.main([*arguments, "--out", str(tmp_path / "given")]) == 0


def test_sft_cache_entries_are_written_atomically_and_killed_writes_are_cleaned(tmp_path):
    config = run.new_config("grpo_sort", False, [*TINY[1::2], "sft.steps=2"])
    task, corpus, _, fingerprint = run.build_task(config, None)
    entry = run.sft_cache_dir(config, fingerprint)
    stale = entry.with_name(f"{entry.name}.tmp-424242")  # a run killed while writing the entry
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert run.run_sft_stage(config, task, corpus, fingerprint) == entry
    assert (entry / "config.json").exists() and (entry / "model.safetensors").exists() and not stale.exists()
    assert sorted(path.name for path in entry.parent.iterdir()) == sorted([entry.name, f"{entry.name}.lock"])


def test_default_run_directories_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run.time, "strftime", lambda *arguments: "20990101-000000")
    args = run.build_parser().parse_args(["grpo_sort"])
    config, _ = run.resolve_config(args)
    with run.claimed_run_directory(args, config) as first, run.claimed_run_directory(args, config) as second:
        assert first != second and first.is_dir() and second.is_dir()
        assert first.name == f"grpo_sort-20990101-000000-{os.getpid()}" and second.name == f"{first.name}-2"


# ---------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(straight, damaged, tmp_path, capsys):
    out = shutil.copytree(straight, tmp_path / "run")
    path = out / "checkpoints" / "step_3" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated write
    assert run.main(["grpo_sort", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"warning: checkpoint {out / 'checkpoints' / 'step_3'} is damaged ({damaged}" in printed
    assert "resuming grpo_sort from step 2" in printed
    assert (out / "checkpoints" / "damaged_step_3" / damaged).exists()  # kept aside, never resumed from again
    _same_run(out, straight)


@pytest.mark.parametrize("edit, reason", [
    (lambda record: {**record, "step": 2}, "trainer_state.json changed"),  # valid JSON, another content
    (lambda record: {}, "trainer_state.json is not a checkpoint's record"),
    (lambda record: None, "trainer_state.json is not a checkpoint's record"),
])
def test_an_edited_or_malformed_trainer_state_counts_as_damage(straight, edit, reason, tmp_path, capsys):
    out = shutil.copytree(straight, tmp_path / "run")
    path = out / "checkpoints" / "step_3" / "trainer_state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert run.main(["grpo_sort", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"is damaged ({reason}); moved to damaged_step_3" in printed and "resuming grpo_sort from step 2" in printed
    _same_run(out, straight)


def test_a_damaged_best_checkpoint_is_refused_in_one_line(tmp_path):
    from engine.checkpoint import CheckpointError

    trainer, model = _nan_trainer(tmp_path, None)
    best = trainer.save(name="best")
    trainer._load_weights(best)  # whole: loads
    weights = best / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"best is damaged \(model.safetensors missing or changed\), so the "
                                              "weights chosen on validation cannot be tested"):
        trainer._load_weights(best)


def test_resume_refuses_a_max_steps_below_the_checkpoint(straight, tmp_path, capsys):
    out = shutil.copytree(straight, tmp_path / "run")
    before = (out / "config.json").read_text()
    assert run.main(["grpo_sort", "--resume", str(out), "--set", "max_steps=2"]) == 2
    error = capsys.readouterr().err
    assert "trainer.max_steps=2: the run's newest checkpoint is at step 3" in error and error.count("\n") == 1
    assert (out / "config.json").read_text() == before  # refused before anything was written


def test_a_damaged_sft_cache_entry_is_named_in_one_line(tmp_path, capsys):
    arguments = ["grpo_sort", *TINY, "--set", "sft.steps=2", "--set", "max_steps=1"]
    assert run.main([*arguments, "--out", str(tmp_path / "first")]) == 0
    (entry,) = [path for path in (tmp_path / "cache" / "sft").iterdir() if path.is_dir()]
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert run.main([*arguments, "--out", str(tmp_path / "second")]) == 2
    error = capsys.readouterr().err
    assert f"could not load {str(entry)!r}: SafetensorError" in error and f"delete {entry} and run again" in error
    assert error.count("\n") == 1


def test_a_lock_path_that_is_a_folder_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    assert run.main([*STRAIGHT, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "cannot be opened as a lock file" in error and error.count("\n") == 1


def test_a_non_empty_out_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    _exits_2_with_one_line([*STRAIGHT, "--out", str(tmp_path / "mine")], "is not empty", capsys)
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_busy_run_directory_names_its_holder_even_when_it_holds_files(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # the holder has started writing
    with run.hold_lock(out / ".lock", "test"):
        assert run.main([*STRAIGHT, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"the run directory {out} is in use by pid {os.getpid()}" in error and error.count("\n") == 1


def test_a_run_that_learned_nothing_exits_1_in_one_line(tmp_path, capsys, monkeypatch):
    def fail(*arguments, **options):
        raise TrainingFailed("none of the 3 RL steps updated the weights")

    monkeypatch.setattr(run, "run_experiment", fail)
    assert run.main([*STRAIGHT, "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == "error: none of the 3 RL steps updated the weights\n"


def test_a_diverged_sft_stops_at_the_first_non_finite_loss(tmp_path):
    from engine.sft import SFTConfig, supervised_finetune
    from models.tiny import train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    model = make_model(tokenizer)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # as after a step with a far too large learning rate
    chats = [[{"role": "user", "content": "Sort these digits: 3 1 2"}]] * 4
    with pytest.raises(TrainingFailed, match="SFT step 1: the loss is nan: before any update, so the model it "
                                             "starts from gives NaN"):
        supervised_finetune(model, tokenizer, chats, ["1 2 3"] * 4, SFTConfig(steps=3, batch_size=2))


def test_a_run_without_a_recorded_warm_start_resumes_without_a_warning(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"config": {}}))  # stopped before its warm start was recorded
    assert run.recorded_initial_model(tmp_path) is None
    assert capsys.readouterr().out == ""


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert "line 3 is not JSON (torn by a crash?): dropped" in capsys.readouterr().out
    truncate_metrics(path, checkpoint_step=2)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n'


def test_cutting_metrics_back_keeps_what_was_written_before_the_checkpoint(tmp_path):
    rows = [{"step": 0, "eval": True, "split": "test"}, {"step": 0, "eval": True, "split": "val"}, {"step": 1},
            {"step": 2}, {"step": 2, "eval": True, "split": "val"}, {"step": 2, "eval": True, "split": "test"},
            {"step": 3}]
    path = tmp_path / "metrics.jsonl"
    for checkpoint_step, expected in [(0, []), (1, rows[:3]), (2, rows[:5])]:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        truncate_metrics(path, checkpoint_step)
        assert read_metrics(path) == expected


def test_resuming_a_finished_run_with_a_torn_line_adds_no_row(straight, tmp_path, capsys):
    out = shutil.copytree(straight, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "reward_me')  # a run killed while appending
    assert run.main(["grpo_sort", "--resume", str(out)]) == 0
    assert "is not JSON (torn by a crash?): dropped" in capsys.readouterr().out
    _same_run(out, straight)


def test_resuming_a_run_killed_before_its_first_checkpoint_adds_no_row(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original_step = Trainer.train_step

    def crash_in_step_two(self):
        if self.step == 1:
            raise RuntimeError("simulated crash")
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_in_step_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.main([*STRAIGHT, "--set", "save_every=0", "--out", str(out)])
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [0, 0, 1]  # no step checkpoint yet
    assert run.main(["grpo_sort", "--resume", str(out), "--set", "save_every=1"]) == 0
    _same_run(out, straight)


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "experiments.run", "grpo_sort", *TINY, "--set", "max_steps=500",
                                "--set", "save_every=0", "--out", str(out)], cwd=ROOT, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not [row for row in (read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else [])
               if row["step"] >= 2] and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error[-2000:]
    last_step = max(row["step"] for row in read_metrics(out / "metrics.jsonl") if not row.get("eval"))
    checkpoint = out / "checkpoints" / f"step_{last_step}"
    assert error.strip().splitlines()[-1] == (f"stopped by SIGINT: checkpoint {checkpoint} written; continue with "
                                              f"--resume {out}")
    assert "Traceback" not in error and checkpoint.is_dir() and 2 <= last_step < 500
    assert run.main(["grpo_sort", "--resume", str(out), "--set", f"max_steps={last_step + 1}"]) == 0
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl") if not row.get("eval")] == list(
        range(1, last_step + 2))


def test_a_second_ctrl_c_exits_at_once_but_torchruns_copy_of_the_first_does_not(monkeypatch, capsys):
    trainer = types.SimpleNamespace(step=4, stop_requested=0)
    clock = iter([100.0, 100.4, 102.0])  # the first signal, torchrun passing it on, a second press
    monkeypatch.setattr(run.time, "monotonic", lambda: next(clock))
    before = signal.getsignal(signal.SIGINT)
    with run.stop_after_the_step_on_signals(trainer):
        signal.raise_signal(signal.SIGINT)
        assert trainer.stop_requested == signal.SIGINT
        assert "SIGINT: stopping after step 5 with a checkpoint" in capsys.readouterr().err
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------
# NaN logits
# ---------------------------------------------------------------------------


class VariedTask:
    """Rewards that vary with the completion (so the gradient is not 0) and an optional logits hook."""

    selection_metric = "reward"

    def __init__(self, logits_hook=None):
        self.logits_hook = logits_hook

    def num_train_prompts(self):
        return 8

    def train_messages(self, index):
        return [{"role": "user", "content": f"Sort these digits: {index} 1 2"}]

    def rewards(self, prompt_indices, completions, rollout):
        return torch.tensor([float(len(text) % 3) for text in completions])

    def evaluate(self, generate, split="test"):
        return {"reward": 0.0}


def _nan_trainer(tmp_path, hook):
    from algorithms.grpo import GRPO
    from models.tiny import train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    model = make_model(tokenizer)
    learner = Learner(model, LearnerConfig(lr=1e-2, loss_agg_mode="token_mean"), GRPO())
    trainer = Trainer(model, tokenizer, VariedTask(hook), GRPO(), learner,
                      TrainerConfig(prompts_per_step=2, group_size=4, max_steps=1), SamplingConfig(max_new_tokens=6),
                      tmp_path)
    return trainer, model


def test_nan_logits_in_the_sampler_skip_the_step_without_touching_weights(tmp_path):
    trainer, model = _nan_trainer(tmp_path, lambda logits, prompts, completion_ids, start: logits * float("nan"))
    trainer.learner.update = lambda batch: pytest.fail("the learner must not see a NaN rollout")
    before = [parameter.detach().clone() for parameter in model.parameters()]
    metrics = trainer.train_step()
    assert metrics["skipped"] == "non-finite sampled log-prob (NaN or inf logit)" and metrics["reward_mean"] is None
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_policy_whose_logits_stay_nan_stops_the_run_after_the_stall_limit(tmp_path, capsys):
    trainer, model = _nan_trainer(tmp_path, lambda logits, prompts, completion_ids, start: logits * float("nan"))
    trainer.config = replace(trainer.config, max_steps=10, stall_warning_steps=3)
    with pytest.raises(TrainingFailed, match="step 3: the policy has sampled NaN or inf log-probs for 3 steps in a "
                                             "row; no RL step has updated it yet, so the model it started from"):
        trainer.train()
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if not row.get("eval")]
    assert [row["step"] for row in rows] == [1, 2, 3]  # logged (reward null: no crash in the progress bar), then stop
    assert all(row["reward_mean"] is None and row["skipped"].startswith("non-finite sampled") for row in rows)
    assert "step 2: skipped: non-finite sampled log-prob" in capsys.readouterr().out


def test_nan_logits_in_the_learner_skip_the_update_and_say_so_once(tmp_path, capsys):
    learning = []

    def nan_when_learning(logits, prompts, completion_ids, start):  # the sampler's logits stay finite
        return logits * float("nan") if learning else logits

    trainer, model = _nan_trainer(tmp_path, nan_when_learning)
    update = trainer.learner.update
    trainer.learner.update = lambda batch: learning.append(True) or update(batch)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    with pytest.raises(TrainingFailed, match="none of the 1 RL steps updated the weights"):
        trainer.train()  # the one step was skipped: the run learned nothing and must not end as a success
    (row,) = [row for row in read_metrics(tmp_path / "metrics.jsonl") if not row.get("eval")]
    assert row["skipped_optimizer_steps"] == 1 and "non-finite loss or gradient" in row["skipped"]
    assert row["loss"] is None  # NaN is written as null
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert capsys.readouterr().out.count("step 1: skipped: 1 optimizer step(s): non-finite loss or gradient") == 1


# ---------------------------------------------------------------------------
# bad input: exit 2 with one line, before any work
# ---------------------------------------------------------------------------


def _exits_2_with_one_line(argv, message, capsys):
    capsys.readouterr()
    assert run.main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error


def test_an_unwritable_out_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    _exits_2_with_one_line([*STRAIGHT, "--out", str(tmp_path / "file" / "run")], "cannot create it (Not a directory)",
                           capsys)
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        _exits_2_with_one_line([*STRAIGHT, "--out", str(locked)], "is not writable", capsys)


def _model_folder(tmp_path, with_tokenizer=True) -> Path:
    from models.tiny import train_tokenizer

    folder = tmp_path / "model"
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    make_model(tokenizer).save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


def test_a_model_folder_with_garbage_weights_exits_2_before_any_work(tmp_path, capsys):
    folder = _model_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    _exits_2_with_one_line(["grpo_sort", "--model", str(folder), "--out", str(tmp_path / "run")],
                           "model.safetensors is not a readable safetensors file", capsys)
    assert not (tmp_path / "run").exists()


def test_a_model_folder_without_a_tokenizer_exits_2_before_any_work(tmp_path, capsys):
    folder = _model_folder(tmp_path, with_tokenizer=False)
    _exits_2_with_one_line(["grpo_sort", "--model", str(folder), "--out", str(tmp_path / "run")],
                           "no tokenizer there", capsys)
    assert not (tmp_path / "run").exists()


def _unknown_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "config.json").unlink(), "no config.json there"),
    (_unknown_model_type, "its config.json does not load"),
    (lambda folder: (folder / "model.safetensors").unlink(), "no weights there (*.safetensors or pytorch_model*.bin)"),
])
def test_a_model_folder_without_a_usable_config_or_weights_exits_2_before_any_work(damage, message, tmp_path, capsys):
    folder = _model_folder(tmp_path)
    damage(folder)
    _exits_2_with_one_line(["grpo_sort", "--model", str(folder), "--out", str(tmp_path / "run")], message, capsys)
    assert not (tmp_path / "run").exists()


def test_a_damaged_cached_stage_is_named_in_one_line(tmp_path):
    from experiments.config import UsageError
    from experiments.warm_start import cached_stage

    model = torch.nn.Linear(3, 2)
    assert cached_stage(model, "stage", {"a": 1}, lambda: [{"step": 1}]) == [{"step": 1}]  # trained and cached
    assert cached_stage(model, "stage", {"a": 1}, lambda: pytest.fail("must reuse")) == [{"step": 1}]
    (entry,) = [path for path in (tmp_path / "cache" / "sft").iterdir() if path.is_dir()]
    (entry / "model.safetensors").write_bytes(b"half")
    with pytest.raises(UsageError, match=f"the cached warm start {entry} is damaged .*; delete that folder"):
        cached_stage(model, "stage", {"a": 1}, lambda: pytest.fail("must not retrain over a damaged entry"))


def test_a_corrupt_config_json_exits_2_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(b'{"config": {"name": "grpo_sort", "ki')
    _exits_2_with_one_line(["grpo_sort", "--resume", str(out)], "config.json is damaged or not a recrl run's", capsys)
    assert [path.name for path in out.iterdir()] == ["config.json"]


def test_a_hand_edited_value_in_config_json_is_named_on_resume(straight, tmp_path, capsys):
    out = shutil.copytree(straight, tmp_path / "run")
    record = json.loads((out / "config.json").read_text())
    record["config"]["trainer"]["group_size"] = "eight"
    (out / "config.json").write_text(json.dumps(record))
    _exits_2_with_one_line(["grpo_sort", "--resume", str(out)],
                           f"--resume {out}: config.json holds a value this recrl refuses (trainer.group_size='eight'",
                           capsys)


def _invalid_text(annotation, rng: random.Random) -> str:
    """A command-line value `annotation` can never accept: letters for a number or a flag, a word outside any
    list of choices (and no folder or hub id) for a string."""
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [option for option in options if option is not type(None)]
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
    if annotation is int:
        return rng.choice([word, f"{rng.uniform(-50, 50):.2f}", f"{rng.randint(1, 9)}e2"])
    if annotation is float:
        return rng.choice([word, f"{rng.randint(0, 9)},{rng.randint(0, 9)}", "1.0.0"])
    if annotation is bool:
        return rng.choice([word, str(rng.randint(2, 99))])
    return f"zz-{word}"


@pytest.mark.parametrize("name", ["grpo_sort", "dapo_sort", "gspo_reddit", "rank_grpo_reddit"])
def test_config_fuzzing_every_key_exits_2_with_one_line_and_no_run_directory(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "run_experiment", lambda *arguments, **options: pytest.fail("an invalid value passed"))
    rng = random.Random(name)
    keys = leaves(run.new_config(name, False, []))
    for key, (annotation, _, _) in keys.items():
        text = _invalid_text(annotation, rng)
        assert run.main([name, "--set", f"{key}={text}"]) == 2, (key, text)
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and key.rsplit(".", 1)[-1] in error, (key, text, error)
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing else


def test_config_fuzzing_of_a_stored_config_exits_2_on_resume(tmp_path, capsys):
    rng = random.Random(14)
    record = to_dict(run.new_config("grpo_sort", False, []))
    for key, (annotation, _, _) in leaves(run.new_config("grpo_sort", False, [])).items():
        if key in ("name", "kind", "task_type", "algorithm"):
            continue
        out = tmp_path / key
        out.mkdir()
        damaged = json.loads(json.dumps(record))
        *sections, leaf = key.split(".")
        section = damaged
        for part in sections:
            section = section[part]
        section[leaf] = rng.choice([[1, 2], {"a": 1}, "x" if annotation is not str else 7])  # never the right type
        (out / "config.json").write_text(json.dumps({"config": damaged}))
        assert run.main(["grpo_sort", "--resume", str(out)]) == 2, key
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and leaf in error, (key, error)
        assert [path.name for path in out.iterdir()] == ["config.json"], key


# ---------------------------------------------------------------------------
# the fault suite
# ---------------------------------------------------------------------------


FAULT_RUN = ["grpo_sort", *TINY[:-4], "--set", "sft.steps=12", "--set", "max_new_tokens=8", "--set", "max_steps=8",
             "--set", "save_every=2", "--set", "eval_every=4"]


def _launch(arguments: list[str], cache: Path, log: Path) -> subprocess.Popen:
    environment = {**os.environ, "RECRL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *arguments], cwd=ROOT, env=environment,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def _half_written(places: list[Path], pattern: str, since: float) -> bool:
    """A temporary folder matching `pattern` in one of `places`, begun after `since` and not yet renamed."""
    for path in (path for place in places for path in place.glob(pattern)):
        with contextlib.suppress(OSError):  # renamed while we look
            if path.stat().st_mtime >= since:
                return True
    return False


def _wait_for_a_write(process: subprocess.Popen, places: list[Path], pattern: str, since: float,
                      timeout: float) -> bool:
    """Poll until this process has begun a write into one of `places` (a new temporary folder)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if _half_written(places, pattern, since):
            return True
        time.sleep(0.0005)
    return False


def _bytes_to_redo(out: Path, copy: Path) -> int:
    """Bytes of metrics.jsonl a resume now would cut (rows after the newest checkpoint: work to redo)."""
    if not (out / "metrics.jsonl").exists():
        return 0
    shutil.copyfile(out / "metrics.jsonl", copy)
    checkpoints = list_checkpoints(out)
    truncate_metrics(copy, int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0)
    return (out / "metrics.jsonl").stat().st_size - copy.stat().st_size


@pytest.mark.slow
def test_fault_suite_sigkill_at_random_moments_then_resume_ends_as_the_uninterrupted_run(tmp_path):
    rng = random.Random(14)
    reference, out, log = tmp_path / "reference", tmp_path / "faulty", tmp_path / "log.txt"
    started = time.monotonic()
    assert _launch([*FAULT_RUN, "--out", str(reference)], tmp_path / "cache-reference", log).wait(timeout=300) == 0
    duration = time.monotonic() - started
    cache = tmp_path / "cache"
    # the moments: during the SFT cache write, during checkpoint writes, and at random times
    moments = ["sft cache write"] + rng.sample(["checkpoint write"] * 5 + ["random time"] * 6, 11)
    faults = []
    for moment in moments:
        arguments = ["--resume", str(out)] if (out / "config.json").exists() else ["--out", str(out)]
        launched = time.time()
        process = _launch([*FAULT_RUN, *arguments], cache, log)
        if moment == "random time":
            try:
                process.wait(timeout=rng.uniform(1.0, 0.7 * duration))
            except subprocess.TimeoutExpired:
                pass
            hit = process.poll() is None
        else:
            places, pattern = (([cache / "sft"], "*.tmp-*") if moment == "sft cache write"
                               else ([out / "checkpoints"], ".tmp_*"))
            hit = _wait_for_a_write(process, places, pattern, launched, timeout=300)
            time.sleep(rng.uniform(0, 0.002))
        process.send_signal(signal.SIGKILL)
        process.wait()
        faults.append({"moment": moment, "killed": hit and process.returncode == -signal.SIGKILL,
                       "inside a write": _half_written([out / "checkpoints"], ".tmp_*", launched)
                       or _half_written([cache / "sft"], "*.tmp-*", launched),
                       "metrics bytes to redo": _bytes_to_redo(out, tmp_path / "metrics-copy.jsonl")})
    assert _launch([*FAULT_RUN, "--resume", str(out)], cache, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    _same_run(out, reference)
    killed = sum(fault["killed"] for fault in faults)
    torn = log.read_text().count("torn by a crash")
    damaged = log.read_text().count("is damaged")
    print(f"\nfault suite: {len(faults)} SIGKILLs tried, {killed} hit the running process "
          f"({sum(fault['inside a write'] for fault in faults)} left a cache or checkpoint write half done); all "
          f"survived: 0 bytes lost (metrics, evaluations, selection and weights equal the uninterrupted run's); "
          f"{sum(fault['metrics bytes to redo'] for fault in faults)} bytes of metrics rows recomputed, {torn} torn "
          f"lines dropped, {damaged} damaged checkpoints set aside; uninterrupted run {duration:.0f} s, "
          f"whole suite {time.monotonic() - started:.0f} s")
    assert killed >= 10


def test_a_resumed_run_starts_from_the_warm_start_it_recorded(tmp_path, monkeypatch, capsys):
    """Even when the SFT cache the run now looks in lacks it (another RECRL_CACHE_DIR, a changed cache key)."""
    out = tmp_path / "run"
    arguments = ["grpo_sort", *TINY, "--set", "sft.steps=2", "--set", "save_every=1"]
    assert run.main([*arguments, "--set", "max_steps=1", "--out", str(out)]) == 0
    recorded = json.loads((out / "config.json").read_text())["initial_model"]
    assert "SFT: 2 steps" in capsys.readouterr().out and Path(recorded).is_dir()
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "empty_cache"))
    assert run.main(["grpo_sort", "--resume", str(out), "--set", "max_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "SFT:" not in printed and "resuming grpo_sort from step 1" in printed
    assert json.loads((out / "config.json").read_text())["initial_model"] == recorded
    assert not (tmp_path / "empty_cache").exists() or not any((tmp_path / "empty_cache").rglob("config.json"))
