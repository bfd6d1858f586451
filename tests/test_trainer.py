"""The RL loop end to end: learning, exact resume, NaN rewards, dynamic sampling, CLI errors."""

import json

import numpy as np
import pytest
import torch

from algorithms.dapo import DAPO, DAPOConfig
from engine.host_memory import is_glibc
from engine.learner import Learner, LearnerConfig
from engine.logging import read_metrics
from engine.rollout import SamplingConfig
from engine.trainer import Trainer, TrainerConfig
from experiments import run
from tests.conftest import make_model

TIMING_KEYS = ("time_rollout_s", "time_reward_s", "time_learn_s", "tokens_per_s", "time_eval_s")
TINY = ["--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "num_layers=1",
        "--set", "prompts_per_step=2", "--set", "group_size=4", "--set", "task.train_size=64",
        "--set", "task.eval_size=8", "--set", "sft.steps=0", "--set", "max_new_tokens=8"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))


def _without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_grpo_sort_quick_learns(tmp_path):
    out = tmp_path / "grpo"
    assert run.main(["grpo_sort", "--quick", "--out", str(out)]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["grpo"]["reward"] > evaluation["sft"]["reward"] + 0.15
    # the reported checkpoint is the best on the validation split; the last step is reported beside it
    selection = json.loads((out / "selection.json").read_text())
    assert selection["metric"] == "reward" and selection["split"] == "val"
    assert [step for step, _ in selection["history"]] == [0, 100]
    assert selection["best_value"] == max(value for _, value in selection["history"])
    assert "grpo/last" in evaluation and (out / "checkpoints" / "best" / "model.safetensors").exists()
    splits = [row.get("split") for row in read_metrics(out / "metrics.jsonl") if row.get("eval")]
    assert splits == ["test", "val", "val", "test"]
    rewards = [row["reward_mean"] for row in read_metrics(out / "metrics.jsonl") if not row.get("eval")]
    assert sum(rewards[-20:]) / 20 > sum(rewards[:20]) / 20 + 0.1
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["name"] == "grpo_sort" and config["data_source"] == "built-in digit sorting"
    assert config["config"]["learner"]["loss_agg_mode"] == "seq_mean_token_mean"  # GRPO's paper default
    assert "torch" in config["environment"]
    # engine/host_memory.py applied (glibc) or not, and said so
    assert config["environment"]["freed_host_memory_retained"] is is_glibc()
    checkpoint = out / "checkpoints" / "step_100"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "trainer_state.json"):
        assert (checkpoint / name).exists(), name
    assert list(out.glob("events.out.tfevents.*"))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    arguments = ["grpo_sort", *TINY, "--set", "max_steps=6", "--set", "save_every=3", "--set", "eval_every=0"]
    straight = tmp_path / "straight"
    assert run.main([*arguments, "--out", str(straight)]) == 0

    interrupted = tmp_path / "interrupted"
    original_step = Trainer.train_step

    def crash_after_step_four(self):
        if self.step == 4:
            raise RuntimeError("simulated crash")
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_after_step_four)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.main([*arguments, "--out", str(interrupted)])
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert len([r for r in read_metrics(interrupted / "metrics.jsonl") if not r.get("eval")]) == 4
    assert (interrupted / "checkpoints" / "step_3").exists()
    assert not list((interrupted / "checkpoints").glob(".tmp*"))

    assert run.main(["grpo_sort", "--resume", str(interrupted)]) == 0
    expected = _without_timings(read_metrics(straight / "metrics.jsonl"))
    resumed = _without_timings(read_metrics(interrupted / "metrics.jsonl"))
    assert resumed == expected
    assert json.loads((interrupted / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no_such_experiment"], "unknown experiment"),
        (["grpo_sort", "--set", "no_such_key=1"], "unknown config key"),
        (["grpo_sort", "--set", "learner.lr=fast"], "learner.lr=fast: expected a value of type float"),
        (["grpo_sort", "--set", "lr=1e-3"], "lr: ambiguous; write one of learner.lr, sft.lr"),
        (["grpo_sort", "--set", "max_steps=1.5"], "expected a value of type int"),
        (["grpo_sort", "--set", "learner.lr"], "expected key=value"),
        (["grpo_sort", "--resume", "/no/such/run"], "no such run directory"),
        ([], "name an experiment"),
        (["grpo_sort", "--bogus"], "unrecognized arguments"),
        (["grpo_sort", "--set", "sampling.dtype=fp8"], "sampling.dtype=fp8: choose one of auto, model, float32"),
        (["grpo_sort", "--set", "temperature=-1"], "sampling.temperature=-1: must be > 0"),
        (["grpo_sort", "--set", "temperature=0"], "sampling.temperature=0: must be > 0"),
        (["grpo_sort", "--set", "group_size=1"], "trainer.group_size=1: must be >= 2"),
        (["grpo_sort", "--set", "max_steps=0"], "trainer.max_steps=0: must be >= 1"),
        (["grpo_sort", "--set", "prompts_per_step=0"], "trainer.prompts_per_step=0: must be >= 1"),
        (["grpo_sort", "--set", "learner.lr=0"], "learner.lr=0: must be in (0, 1]"),
        (["grpo_sort", "--set", "learner.lr=nan"], "learner.lr=nan: expected a finite number"),
        (["grpo_sort", "--set", "learner.lr=inf"], "learner.lr=inf: expected a finite number"),
        (["grpo_sort", "--set", "temperature=inf"], "sampling.temperature=inf: expected a finite number"),
        (["grpo_sort", "--set", "kl_coef=-inf"], "learner.kl_coef=-inf: expected a finite number"),
        (["grpo_sort", "--set", "seed=-1"], "seed=-1: must be in [0, 2**32)"),
        (["grpo_sort", "--set", "kl_loss_type=k9"], "learner.kl_loss_type=k9: choose one of k1, k2, k3"),
        (["grpo_sort", "--set", "loss_agg_mode=sum"], "learner.loss_agg_mode=sum: choose one of token_mean"),
        (["grpo_sort", "--set", "lr_schedule=step"], "learner.lr_schedule=step: choose one of constant"),
        (["grpo_sort", "--set", "advantage_scale=rank"], "strategy.advantage_scale=rank: choose one of group"),
        (["grpo_sort", "--set", "overlong_max_length=4"], "unknown config key"),  # a DAPO option, not GRPO's
        (["grpo_sort", "--set", "algorithm=ppo"], "unknown algorithm 'ppo'"),
        (["grpo_sort", "--set", "name=x"], "name: cannot be set"),
        (["grpo_sort", "--set", "loss_agg_mode=seq_mean_unit_mean"], "grpo has no units to average"),
        (["grpo_sort", "--set", "hidden_size=102"], "model.tiny.hidden_size=102: must be a multiple of num_heads"),
        (["grpo_sort", "--set", "hidden_size=100"], "model.tiny.hidden_size=100: hidden_size / num_heads = 25 must be even"),
        (["dapo_sort", "--set", "overlong_cache_length=40"], "strategy.overlong_cache_length=40: must be in"),
        (["rank_grpo_reddit", "--set", "reward_kind=dcg"], "task.reward_kind=dcg: choose one of exp_inf"),
        (["rank_grpo_reddit", "--set", "task.source=imdb"], "task.source=imdb: choose one of auto"),
        (["grpo_sort", "--set", "learner.lr=2"], "learner.lr=2: must be in (0, 1]"),
        (["grpo_sort", "--set", "sft.lr=1e10"], "sft.lr=1e10: must be in (0, 1]"),
        (["grpo_sort", "--set", "advantage_eps=0"], "strategy.advantage_eps=0: must be > 0"),
        (["grpo_sort", "--set", "mini_batches=65"], "learner.mini_batches=65: must be <= the rows of a step"),
        (["grpo_sort", "--set", "algorithm=rank_grpo"],
         "algorithm=rank_grpo learns from one reward per rank of the recommended list, but the sort task gives one "
         "reward per completion: use grpo or gspo or dapo"),
        (["grpo_sort", "--set", "algorithm=rerec"], "algorithm=rerec learns from one reward per reasoning line"),
        (["grpo_sort", "--set", "algorithm=recpo"],
         "algorithm=recpo learns from one ranking reward per reasoning path"),
        (["rank_grpo_reddit", "--set", "reward_kind=ndcg"],
         "the recommendation task gives one reward per completion: use grpo or gspo or dapo, or change "
         "task.reward_kind"),
        (["grpo_rerec_ml100k", "--set", "reward_unit=line"], "use rerec, or change task.reward_unit"),
        (["grpo_sort", "--data-dir", "/tmp"], "--data-dir: grpo_sort builds its own examples and reads no data"),
        (["gr2_ml100k", "--set", "task.num_candidates=5000"], "task.num_candidates=5000: must be in [2, 100]"),
        (["grpo_sort", "--resume", ".", "--quick"], "with its own settings; drop --quick"),
    ],
)
def test_cli_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bad config must fail before any run directory is made
    assert run.main(argv) == 2
    assert not (tmp_path / "runs").exists()
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_task_warm_start_that_refuses_the_settings_exits_2_in_one_line(tmp_path, capsys, monkeypatch):
    class RefusingTask:  # as RecPO's stage 1 with a rationale longer than sampling.max_new_tokens
        def warm_start(self, model, tokenizer, config):
            raise ValueError("a stage-1 rationale has 51 tokens, more than sampling.max_new_tokens=1: raise it")

    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    arguments = [*TINY, "--set", "sft.steps=1"]
    config = run.new_config("grpo_sort", False, arguments[1::2])
    task, corpus, _, fingerprint = run.build_task(config, None)
    monkeypatch.setattr(run, "build_task", lambda *arguments: (RefusingTask(), corpus, "test", fingerprint))
    assert run.main(["grpo_sort", *arguments, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error == "error: a stage-1 rationale has 51 tokens, more than sampling.max_new_tokens=1: raise it\n"
    assert not (tmp_path / "run").exists()  # it recorded nothing: no folder left behind


def test_mini_batches_are_checked_against_each_process_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run.distributed, "start", lambda device: None)
    monkeypatch.setattr(run.distributed, "rank_and_size", lambda: (0, 2))  # as under torchrun --nproc_per_node 2
    argv = ["grpo_sort", "--set", "prompts_per_step=2", "--set", "group_size=4", "--set", "mini_batches=5"]
    assert run.main(argv) == 2  # 8 rows in all, 4 on each process
    error = capsys.readouterr().err
    assert "learner.mini_batches=5: must be <= the rows of a step on each of the 2 processes (4)" in error
    assert error.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_resume_refuses_changed_settings_except_the_run_length(tmp_path, capsys):
    out = tmp_path / "run"
    arguments = ["grpo_sort", *TINY, "--set", "max_steps=2", "--set", "save_every=1", "--set", "eval_every=0"]
    assert run.main([*arguments, "--out", str(out)]) == 0
    capsys.readouterr()
    assert run.main(["grpo_sort", "--resume", str(out), "--set", "learner.lr=0.01"]) == 2
    error = capsys.readouterr().err
    assert "--resume: learner.lr was 0.0003 in that run, 0.01 now" in error and error.count("\n") == 1
    assert run.main(["grpo_sort", "--resume", str(out), "--set", "max_steps=3"]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["trainer"]["max_steps"] == 3
    assert record["resumes"][-1]["changes"] == {"trainer.max_steps": [2, 3]}
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl") if not row.get("eval")] == [1, 2, 3]


def test_show_config_lists_every_key_with_value_and_default(capsys):
    assert run.main(["rank_grpo_reddit", "--show-config", "--set", "learner.ppo_epochs=2"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    # key, type, this experiment's value, the default (the strategy's paper value here), short name
    assert lines["learner.clip_ratio_high"][:4] == ["learner.clip_ratio_high", "float", "0.08", "0.08"]
    assert lines["learner.loss_agg_mode"][:4] == ["learner.loss_agg_mode", "str", "'token_mean'",
                                                  "'seq_mean_unit_mean'"]  # the code's vs the paper's
    assert lines["learner.ppo_epochs"] == ["learner.ppo_epochs", "int", "2", "1", "ppo_epochs"]
    assert lines["learner.lr"] == ["learner.lr", "float", "2e-05", "1e-05"]  # no short name: sft.lr has it too
    assert "strategy.length_shaping" in lines and "task.reward_kind" in lines and "sft.steps" in lines


def test_sft_cache_key_covers_the_sft_config_and_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path))
    config = run.new_config("rank_grpo_reddit", False, [])
    same = run.sft_cache_dir(config, "data-a")
    assert same == run.sft_cache_dir(run.new_config("rank_grpo_reddit", False, ["learner.lr=1e-3"]), "data-a")
    assert same != run.sft_cache_dir(config, "data-b")  # other data files
    for change in ("sft.lr=1e-4", "sft.batch_size=8", "hidden_size=96", "task.train_cut_points=7", "seed=1"):
        assert same != run.sft_cache_dir(run.new_config("rank_grpo_reddit", False, [change]), "data-a"), change


def test_list_names_every_experiment(capsys):
    assert run.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("grpo_sort", "gspo_sort", "dapo_sort"):
        assert name in listed


class ToyTask:
    """Prompt i asks for nothing in particular; rewards come from a function of (i, text)."""

    def __init__(self, reward):
        self.reward = reward

    def num_train_prompts(self):
        return 8

    def train_messages(self, index):
        return [{"role": "user", "content": f"Sort these digits: {index} 1 2"}]

    def rewards(self, prompt_indices, completions, rollout):
        return torch.tensor([self.reward(i, text) for i, text in zip(prompt_indices, completions)])

    selection_metric = "reward"

    def evaluate(self, generate, split="test"):
        return {"reward": 0.0}


def _trainer(tokenizer, tmp_path, task, strategy, **config):
    model = make_model(tokenizer)
    learner = Learner(model, LearnerConfig(lr=1e-2, loss_agg_mode="token_mean"), strategy)
    trainer_config = TrainerConfig(prompts_per_step=2, group_size=4, **config)
    return Trainer(model, tokenizer, task, strategy, learner, trainer_config, SamplingConfig(max_new_tokens=6),
                   tmp_path), model


def test_nan_rewards_skip_the_step_without_touching_weights(tokenizer, tmp_path):
    task = ToyTask(lambda index, text: float("nan") if len(text) % 2 else 1.0)
    trainer, model = _trainer(tokenizer, tmp_path, task, DAPO(DAPOConfig(dynamic_sampling=False)))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.train_step()
    assert "non-finite reward" in metrics["skipped"]
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_dynamic_sampling_refills_the_batch(tokenizer, tmp_path):
    # Even prompts: all rewards equal (no signal, dropped); odd prompts: rewards vary with the text.
    given = []  # every reward the task returned, kept or dropped
    task = ToyTask(lambda index, text: given.append(1.0 if index % 2 == 0 else float(len(text) % 3)) or given[-1])
    trainer, _ = _trainer(tokenizer, tmp_path, task, DAPO(), max_generation_rounds=6)
    captured = []
    original_update = trainer.learner.update
    trainer.learner.update = lambda batch: captured.append(batch) or original_update(batch)
    metrics = trainer.train_step()
    (batch,) = captured
    assert batch.rollout.num_rows == 2 * 4  # full batch: prompts_per_step groups of G
    assert 0.0 < metrics["frac_groups_dropped"] < 1.0
    assert trainer.prompts.consumed > 2  # it sampled more prompts than one round
    # reward_mean and reward_std describe the same rewards: all that were sampled, before shaping
    assert len(given) == trainer.prompts.consumed * 4
    assert metrics["reward_mean"] == pytest.approx(np.mean(given))
    assert metrics["reward_std"] == pytest.approx(np.std(given, ddof=1), rel=1e-6)


def test_dynamic_sampling_gives_up_after_max_rounds(tokenizer, tmp_path):
    trainer, model = _trainer(tokenizer, tmp_path, ToyTask(lambda index, text: 1.0), DAPO(), max_generation_rounds=2)
    metrics = trainer.train_step()
    assert "kept no group" in metrics["skipped"] and metrics["frac_groups_dropped"] == 1.0
    assert trainer.prompts.consumed == 4


def test_no_reward_spread_is_reported_loudly(tokenizer, tmp_path):
    """Every group with equal rewards means zero advantages: after `stall_warning_steps` such steps
    the metrics say so (and the gradient norm is 0, the other condition watched)."""
    from algorithms.grpo import GRPO

    trainer, _ = _trainer(tokenizer, tmp_path, ToyTask(lambda index, text: 1.0), GRPO(), stall_warning_steps=2)
    first = trainer.train_step()
    trainer.step += 1
    second = trainer.train_step()
    assert first["zero_spread_frac"] == 1.0 and "warning" not in first
    assert "no reward spread in any group for 2 steps" in second["warning"]
    assert "gradient norm 0 for 2 steps" in second["warning"]
    assert second["grad_norm"] == 0.0
    varied, _ = _trainer(tokenizer, tmp_path / "varied", ToyTask(lambda index, text: float(len(text) % 3)), GRPO(),
                         stall_warning_steps=2)
    assert all("warning" not in varied.train_step() for _ in range(3))


def test_reported_checkpoint_is_the_best_on_validation_not_the_last(tokenizer, tmp_path):
    from algorithms.grpo import GRPO

    class DecliningTask(ToyTask):
        """Validation gets worse with every evaluation; the test metric reads the model's weights."""

        def __init__(self):
            super().__init__(lambda index, text: float(len(text) % 3))
            self.validations, self.model = 0, None

        def evaluate(self, generate, split="test"):
            if split == "val":
                self.validations += 1
                return {"reward": 1.0 / self.validations}
            return {"reward": float(sum(p.detach().double().sum() for p in self.model.parameters()))}

    task = DecliningTask()
    trainer, model = _trainer(tokenizer, tmp_path, task, GRPO(), max_steps=3, eval_every=1)
    task.model = model
    initial = float(sum(p.detach().double().sum() for p in model.parameters()))
    trainer.train()
    final = float(sum(p.detach().double().sum() for p in model.parameters()))
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["best_step"] == 0 and len(selection["history"]) == 4
    assert evaluation["rl"]["reward"] == pytest.approx(initial, rel=1e-12)  # the step-0 weights were tested
    assert evaluation["rl/last"]["reward"] != pytest.approx(initial, rel=1e-9)  # the last step's were not
    assert final == pytest.approx(initial, rel=1e-12)  # the model ends holding the reported (best) weights
