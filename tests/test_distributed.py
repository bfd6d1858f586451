"""Several processes (engine/distributed.py) on CPU with the gloo backend.

The claim checked: N processes, each back-propagating its own share of whole groups with the
step's token and row counts all-reduced, make the update one process makes from the whole
batch: the same weights (fp32, 1e-6), the same pre-clip gradient norm and the same loss,
for DDP and for FSDP2 (sharded per decoder block), for a token normaliser (`token_mean`) and
a row normaliser (`seq_mean_token_mean`), with gradient accumulation over micro-batches.
And a 2-process `grpo_sort` under torchrun runs and resumes to the same metrics and weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing

from algorithms.grpo import GRPO
from engine import distributed
from engine.learner import Learner, LearnerConfig, PolicyBatch, Rewards
from engine.logging import read_metrics
from engine.logprobs import unwrap_model
from engine.rollout import SamplingConfig, sample
from models.tiny import train_tokenizer
from tests.conftest import CORPUS, left_padded_prompts, make_model

ROOT = Path(__file__).resolve().parents[1]
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
MODES = ("ddp", "fsdp2")
GROUP_SIZE = 3
HEAD_CASE = ("ddp", "seq_mean_token_mean", "head")  # GRPOWithHead, beside the plain GRPO cases


def _batch(tokenizer, model) -> PolicyBatch:
    """4 prompts x 3 samples with rewards that differ inside each group (so the gradient is not 0)."""
    ids, mask = left_padded_prompts(tokenizer, ["Sort these digits: 3 1 2", "Fargo", "1 2 3", "Heat (1995)"])
    rollout = sample(model, ids, mask, GROUP_SIZE, SamplingConfig(max_new_tokens=8), [tokenizer.eos_token_id],
                     tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    rewards = Rewards.from_tensor((torch.arange(rollout.num_rows) % 5).float())
    unit_ids = GRPO().unit_ids(rollout, rewards)
    return PolicyBatch(rollout, rewards, unit_ids, GRPO().advantages(rewards, rollout, unit_ids))


class GRPOWithHead(GRPO):
    """GRPO plus a linear head of its own on each row's last completion hidden state, trained to
    predict the row's reward: its gradients are averaged over the ranks by the learner, not by DDP."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(64, 1)
        torch.nn.init.constant_(self.module.weight, 0.01)  # the same head on every rank and in every run
        torch.nn.init.constant_(self.module.bias, 0.0)

    def hidden_positions(self, batch):
        return batch.rollout.completion_mask.sum(dim=1) - 1  # [B]

    def extra_loss(self, model, batch, rows, hidden):
        return ((self.module(hidden).squeeze(1) - batch.rewards.values[rows, 0]) ** 2).sum()


def _update(model, batch, aggregation, strategy=None) -> dict:
    config = LearnerConfig(lr=1e-4, micro_batch_size=2, loss_agg_mode=aggregation, max_grad_norm=100.0)
    return Learner(model, config, strategy or GRPO()).update(batch)


def _whole_weights(model) -> dict:
    with distributed.full_weights(model):
        return {name: parameter.detach().clone() for name, parameter in unwrap_model(model).named_parameters()}


def _worker(rank: int, size: int, rendezvous: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    results = {}
    for key in [(mode, aggregation, "plain") for mode in MODES for aggregation in AGGREGATIONS] + [HEAD_CASE]:
        mode, aggregation = key[:2]
        model = make_model(tokenizer, seed=5)
        batch = _batch(tokenizer, model)  # the same batch on every rank (a seeded generator)
        groups = distributed.shard(list(range(batch.rollout.num_rows // GROUP_SIZE)))  # whole groups
        rows = torch.tensor([group * GROUP_SIZE + g for group in groups for g in range(GROUP_SIZE)])
        share = PolicyBatch(batch.rollout.select_rows(rows), batch.rewards.select_rows(rows),
                            batch.unit_ids[rows], batch.advantages[rows])
        wrapped = distributed.wrap(model, mode)
        strategy = GRPOWithHead() if key == HEAD_CASE else None
        metrics = _update(wrapped, share, aggregation, strategy)
        weights = _whole_weights(wrapped)
        if strategy is not None:
            weights.update({f"head.{name}": value.detach().clone() for name, value in strategy.module.named_parameters()})
        results[key] = {"weights": weights, "metrics": metrics, "rows": rows.numel()}
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """{(mode, aggregation, "plain" | "head"): (one-process result, rank 0's result of 2 processes)}."""
    directory = tmp_path_factory.mktemp("distributed")
    multiprocessing.spawn(_worker, args=(2, str(directory / "rendezvous"), str(directory / "result.pt")), nprocs=2)
    two = torch.load(directory / "result.pt", weights_only=False)
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    results = {}
    for key, result in two.items():
        model = make_model(tokenizer, seed=5)
        strategy = GRPOWithHead() if key == HEAD_CASE else None
        metrics = _update(model, _batch(tokenizer, model), key[1], strategy)
        weights = dict(model.named_parameters())
        if strategy is not None:
            weights.update({f"head.{name}": value for name, value in strategy.module.named_parameters()})
        results[key] = ({"weights": weights, "metrics": metrics}, result)
    return results


@pytest.mark.slow  # two spawned processes: 36-56 s measured on 2 shared, busy cores
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_two_processes_update_the_weights_as_one_process_does(updates, mode, aggregation):
    _check_one_against_two(*updates[mode, aggregation, "plain"], head=False)


@pytest.mark.slow
def test_a_strategy_head_is_averaged_over_the_processes(updates):
    _check_one_against_two(*updates[HEAD_CASE], head=True)


def _check_one_against_two(one, two, head):
    assert two["rows"] == 6  # each rank trained on 2 of the 4 groups
    initial = make_model(train_tokenizer(CORPUS, vocab_size=300), seed=5)
    moved = 0.0
    differing, total = 0, 0
    for name, parameter in initial.named_parameters():
        if head:
            # the head's loss reaches every weight, some with gradients at rounding level, whose sign the order
            # of summation decides; Adam's first step is then +-lr (1e-4) there: count them, bound them
            difference = (two["weights"][name] - one["weights"][name].detach()).abs()
            assert float(difference.max()) < 2.01e-4, name
            differing, total = differing + int((difference > 1e-5).sum()), total + difference.numel()
        else:
            torch.testing.assert_close(two["weights"][name], one["weights"][name].detach(), atol=1e-6, rtol=0)
        moved = max(moved, float((one["weights"][name].detach() - parameter.detach()).abs().max()))
    assert moved > 5e-5  # the update moved the weights (Adam's first step: about lr = 1e-4)
    # Adam's step barely depends on the gradient's scale; the norm and the loss do: a normaliser off by the
    # number of processes would show here
    assert two["metrics"]["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=1e-5)
    assert one["metrics"]["grad_norm"] > 0.1
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], abs=1e-6)
    if head:  # the head's own parameters moved, and alike in both runs
        assert differing < 0.005 * total
        for name in ("head.weight", "head.bias"):
            torch.testing.assert_close(two["weights"][name], one["weights"][name].detach(), atol=1e-6, rtol=0)
        assert float((one["weights"]["head.weight"].detach() - 0.01).abs().max()) > 5e-5


def test_a_strategy_head_under_fsdp2_is_refused_with_the_fix():
    class Sharded(torch.nn.Linear):
        pass

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("engine.learner.is_sharded", lambda model: True)
        with pytest.raises(ValueError, match="trainer.distributed=ddp"):
            Learner(Sharded(2, 2), LearnerConfig(), GRPOWithHead())


def test_shards_are_whole_contiguous_and_cover_everything():
    assert distributed.shard(list(range(5))) == [0, 1, 2, 3, 4]  # one process: everything
    assert distributed.rank_and_size() == (0, 1)
    assert distributed.gather("x") == ["x"] and distributed.broadcast(3) == 3
    distributed.stop(finished=True)  # alone: no process group to leave, no barrier to wait at


TINY_SORT = ["--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "num_layers=1",
             "--set", "prompts_per_step=4", "--set", "group_size=4", "--set", "task.train_size=64",
             "--set", "task.eval_size=8", "--set", "sft.steps=40", "--set", "max_new_tokens=8",
             "--set", "max_steps=4", "--set", "save_every=2", "--set", "eval_every=2", "--set", "learner.lr=3e-3"]
TIMING_KEYS = ("time_rollout_s", "time_reward_s", "time_learn_s", "tokens_per_s", "time_eval_s")


def _torchrun(arguments: list[str], cache: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RECRL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "experiments.run", *arguments], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_grpo_sort_on_two_processes_with_fsdp2_runs_and_resumes(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    finished = _torchrun(["grpo_sort", "--quick", *TINY_SORT, "--set", "trainer.distributed=fsdp2",
                          "--out", str(out)], tmp_path / "cache")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("run directory:") == 1  # rank 0 speaks for the run
    rows = read_metrics(out / "metrics.jsonl")
    steps = [row for row in rows if not row.get("eval")]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert all(row["tokens"] > 0 for row in steps) and any(row["grad_norm"] > 0 for row in steps)
    weights = load_file(out / "checkpoints" / "step_4" / "model.safetensors")
    evaluation = json.loads((out / "eval.json").read_text())
    assert len(torch.load(out / "checkpoints" / "step_4" / "rng_state.pt", weights_only=False)) == 2  # every rank's

    # as if the run had died before its last checkpoint: resume from step 2
    (out / "checkpoints" / "step_4").rename(tmp_path / "step_4")
    resumed = _torchrun(["grpo_sort", "--resume", str(out)], tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming grpo_sort from step 2" in resumed.stdout

    def without_timings(rows):
        return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in rows]

    assert without_timings(read_metrics(out / "metrics.jsonl")) == without_timings(rows)
    assert json.loads((out / "eval.json").read_text()) == evaluation
    for name, tensor in load_file(out / "checkpoints" / "step_4" / "model.safetensors").items():
        assert torch.equal(tensor, weights[name]), name
