"""experiments/bench.py: the floor's work counted by hand, the run breakdown from a run directory,
and the suites run on CPU reporting the keys the README and the issue name (no timed assertions);
and the update's lean LM-head path (engine/logprobs.py) against plain autograd."""

import json
from pathlib import Path

import pytest
import torch

from engine.logprobs import completion_logprobs
from experiments import bench
from tests.conftest import left_padded_prompts, make_model

TOY = bench.BenchConfig("T", hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16,
                        vocab_size=32, prompts=2, group_size=2, prompt_length=4, new_tokens=3,
                        step_micro_batch_size=3, logits_chunk_size=2)


def test_decode_bytes_per_step_counts_weights_and_kv_once():
    model = bench.build_model(TOY, "cpu")
    # weights: embedding 32*8 (tied, so it is also the LM head) + q 8*8+8, k 4*8+4, v 4*8+4,
    # o 8*8, gate/up/down 3 * 8*16, two layer norms 2*8, final norm 8 = 872 parameters.
    # K/V per position: 2 (k, v) * 1 layer * 1 kv head * head_dim 4 = 8 values;
    # prompts 2 * 4 positions * 8 = 64; generated, mean over 3 steps: 4 rows * 2 * 8 = 64.
    assert bench.decode_bytes_per_step(model, TOY) == (872 + 64 + 64) * 4
    assert bench.decode_bytes_per_step(model, TOY, element_size=2) == (872 + 64 + 64) * 2


def test_floor_work_matches_a_hand_count():
    # Per token, one layer: qkv 2*8*16 + o 2*8*8 + gate/up 2*8*32 + down 2*16*8 = 1152 FLOPs;
    # LM head 2*8*32 = 512 per position that needs logits. Attention per (row, head) and key
    # attended: 2*4 (scores) + 2*4 (mix) = 16.
    # Prefill: 2 prompts x 4 tokens = 8 tokens -> 9216; causal keys 4*5/2 = 10 per prompt and
    # head -> 16 * 10 * 2 prompts * 2 heads = 640; LM head at the 2 last positions -> 1024.
    prefill, decode = bench.rollout_products(TOY)
    assert bench.total_flops(prefill) == 9216 + 640 + 1024
    # Decode: T - 1 = 2 steps of 4 rows: 8 tokens -> 9216; step j attends 4 + j keys (5, 6) ->
    # 16 * 11 * 4 rows * 2 heads = 1408; LM head at 8 positions -> 4096.
    assert bench.total_flops(decode) == 9216 + 1408 + 4096
    # Recompute over 4 rows of 7 positions: 28 tokens -> 32256; causal keys 7*8/2 = 28 -> 16 * 28 *
    # 4 rows * 2 heads = 3584; LM head at the 3 completion-predicting positions of 4 rows -> 6144.
    assert bench.total_flops(bench.logprobs_products(TOY, rows=4, chunk_size=2)) == 32256 + 3584 + 6144
    # Update: forward + backward (two products per forward product) = 3x, in micro-batches of 3 + 1 rows.
    assert bench.total_flops(bench.update_products(TOY)) == 3 * (32256 + 3584 + 6144)


def test_backward_products_are_the_two_gradient_products():
    forward = bench.Matmul("proj", m=5, k=3, n=7, layout="nt", weight=True)
    grad_input, grad_weight = bench.backward_products([forward])
    assert (grad_input.m, grad_input.k, grad_input.n, grad_input.layout) == (5, 7, 3, "nn")  # dC [5, 7] @ B^T [7, 3]
    assert (grad_weight.m, grad_weight.k, grad_weight.n, grad_weight.layout) == (3, 5, 7, "tn")  # A^T [3, 5] @ dC
    assert not grad_input.weight and not grad_weight.weight
    assert grad_input.flops == grad_weight.flops == forward.flops == 2 * 5 * 3 * 7


def test_product_timer_charges_counts_and_useful_fractions(monkeypatch):
    timer = bench.ProductTimer(bench.Clock("cpu"), torch.float32)
    timed_shapes = []
    monkeypatch.setattr(timer, "_seconds_per_call", lambda product: timed_shapes.append(product.shape) or 0.01)
    scores = bench.Matmul("scores", m=16, k=8, n=16, batch=4, count=3, layout="nt")
    half = bench.Matmul("scores", m=16, k=8, n=16, batch=4, count=1, layout="nt", useful=0.5)
    other = bench.Matmul("mix", m=16, k=16, n=8, batch=4, count=2)
    assert timer.seconds([scores, half, other]) == pytest.approx(0.01 * (3 + 0.5 + 2))
    assert timed_shapes == [scores.shape, other.shape]  # each distinct shape timed once


def test_product_timer_times_real_products():
    timer = bench.ProductTimer(bench.Clock("cpu"), torch.float32, min_seconds=1e-4)
    products = bench.rollout_products(TOY)[1] + bench.update_products(TOY)
    assert timer.seconds(products) > 0
    assert any(len(candidates) == 2 for candidates in timer.operands.values()) == bench._onednn_linear_available()


def _write_run(path, sft_folder, eval_timed=True, best_step=2):
    rows = [
        {"step": 0, "eval": True, "split": "test", "time_eval_s": 4.0},
        {"step": 0, "eval": True, "split": "val", "time_eval_s": 1.0},
        {"step": 1, "time_rollout_s": 2.0, "time_reward_s": 0.25, "time_learn_s": 3.0},
        {"step": 2, "time_rollout_s": 2.5, "time_reward_s": 0.25, "time_learn_s": 3.5},
        {"step": 2, "eval": True, "split": "val", "time_eval_s": 1.5},
        {"step": 2, "eval": True, "split": "test", "time_eval_s": 5.0},
    ]
    if not eval_timed:
        for row in rows:
            row.pop("time_eval_s", None)
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / "config.json").write_text(json.dumps({"initial_model": str(sft_folder)}))
    (path / "selection.json").write_text(json.dumps({"best_step": best_step}))


def test_breakdown_splits_a_run_into_its_phases(tmp_path, capsys):
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "sft_time.json").write_text(json.dumps({"seconds": 10.0}))
    _write_run(tmp_path / "run", sft, best_step=2)
    result = bench.run_breakdown(tmp_path / "run")
    assert result["seconds"] == {"sft": 10.0, "rollout": 4.5, "reward": 0.5, "update": 6.5, "evaluation": 11.5}
    assert result["total_seconds"] == 33.0 and result["steps"] == 2
    assert result["share"]["update"] == pytest.approx(6.5 / 33.0)
    # The best checkpoint (step 1) is not the last: its test evaluation, not a row, costs one more test evaluation.
    _write_run(tmp_path / "run_best_earlier", sft, best_step=1)
    assert bench.run_breakdown(tmp_path / "run_best_earlier")["seconds"]["evaluation"] == 11.5 + 5.0
    # A run from before evaluations were timed: evaluation unknown and said so.
    _write_run(tmp_path / "old", tmp_path / "missing", eval_timed=False)
    old = bench.run_breakdown(tmp_path / "old")
    assert old["seconds"]["evaluation"] is None and old["seconds"]["sft"] is None and old["notes"]
    assert old["total_seconds"] == 11.5
    assert bench.main(["breakdown", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["seconds"]["sft"] == 10.0
    assert bench.main(["breakdown", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_suites_report_their_figures(tmp_path, capsys):
    for suite, keys in [("rollout", ["recrl_tokens_per_s", "generate_tokens_per_s", "speedup", "speedup_range",
                                     "prefill_seconds"]),
                        ("logprobs", ["recrl_peak_bytes", "naive_peak_bytes", "peak_ratio"]),
                        ("step", ["step_s", "phases"])]:
        path = tmp_path / f"{suite}.json"
        assert bench.main([suite, "--device", "cpu", "--repeats", "1", "--json", str(path)]) == 0
        result = json.loads(path.read_text())
        assert result["suite"] == suite and result["config"]["name"] == "C0"
        for key in keys:
            assert key in result
        parts = {"rollout": {"recrl", "generate"}, "logprobs": {"recrl", "naive"},
                 "step": {"update", "rollout", "step"}}[suite]
        for part in parts:
            report = result["floor"][part]
            assert report["floor_seconds"] > 0 and report["fraction_of_floor"] > 0 and report["flops"] > 0
        if suite == "rollout":
            assert result["recrl_tokens_per_s"] > 0 and result["speedup"] > 0
        if suite == "step":
            assert set(result["phases"]) == {"rollout", "reward", "advantages", "update"}
            assert result["step_s"] >= result["phases"]["update"] > 0
        if suite == "logprobs":
            assert 0 < result["recrl_peak_bytes"] < result["naive_peak_bytes"]


@pytest.mark.parametrize("chunk_size", [64, 3])  # one chunk (p kept for the backward) / chunks (logits recomputed)
@pytest.mark.parametrize("constrained", [False, True])
def test_lean_lm_head_backward_matches_autograd_through_a_full_log_softmax(tokenizer, chunk_size, constrained):
    """The update's LM-head path (engine/logprobs.py: its own backward, entropy from the same logits)
    against plain autograd through the full [B, T, V] log-softmax of the model's own logits."""
    torch.manual_seed(0)
    prompt_ids, prompt_mask = left_padded_prompts(tokenizer, ["Sort these digits: 3 1 2", "Fargo"])
    completion_ids = torch.randint(3, len(tokenizer), (2, 7))
    completion_mask = torch.ones(2, 7, dtype=torch.bool)
    completion_mask[1, 4:] = False
    allowed = torch.rand(len(tokenizer)) < 0.6
    allowed[completion_ids.flatten()] = True  # the sampled tokens were allowed

    def hook(logits, prompt_indices, ids, start):  # [N, C, V] -> disallowed tokens -inf
        return logits.masked_fill(~allowed, float("-inf"))

    weights = torch.linspace(-1.0, 2.0, 14).view(2, 7)  # an arbitrary upstream gradient
    results = []
    for lean in (True, False):
        model = make_model(tokenizer).train()
        if lean:
            scores = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                         temperature=0.7, chunk_size=chunk_size, with_entropy=True,
                                         logits_hook=hook if constrained else None)
            logprobs, entropy = scores.logprobs, scores.entropy
        else:
            input_ids = torch.cat([prompt_ids, completion_ids], 1)
            attention = torch.cat([prompt_mask, completion_mask], 1).long()
            logits = model(input_ids=input_ids, attention_mask=attention,
                           position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits
            logits = logits[:, prompt_ids.shape[1] - 1 : -1].float()  # [B, T, V] predicting each completion token
            logits = (logits.masked_fill(~allowed, float("-inf")) if constrained else logits) / 0.7
            log_softmax = logits.log_softmax(-1)
            logprobs = log_softmax.gather(-1, completion_ids[..., None]).squeeze(-1) * completion_mask
            probabilities = log_softmax.exp().detach()
            entropy = -(probabilities * log_softmax.detach().nan_to_num(neginf=0.0)).sum(-1) * completion_mask
        (logprobs * weights).sum().backward()
        results.append((logprobs.detach(), entropy, [p.grad for p in model.parameters()]))
    (lean_logprobs, lean_entropy, lean_grads), (logprobs, entropy, grads) = results
    torch.testing.assert_close(lean_logprobs, logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean_entropy, entropy, atol=1e-5, rtol=1e-5)
    for lean_grad, grad in zip(lean_grads, grads):
        torch.testing.assert_close(lean_grad, grad, atol=1e-5, rtol=1e-4)
    assert float(lean_entropy[1, 4:].abs().sum()) == 0.0 and float(lean_entropy[0].min()) > 0


@pytest.mark.parametrize("make_target, problem", [
    (lambda tmp_path: tmp_path, "is a folder; name a file"),
    (lambda tmp_path: Path("/proc/recrl-bench.json"), "cannot be written"),
])
def test_an_unusable_json_path_is_refused_before_measuring(make_target, problem, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench.SUITES, "logprobs", lambda *arguments, **options: pytest.fail("measured anyway"))
    target = make_target(tmp_path)
    assert bench.main(["logprobs", "--device", "cpu", "--json", str(target)]) == 2
    assert bench.main(["breakdown", str(tmp_path), "--json", str(target)]) == 2
    error = capsys.readouterr().err
    lines = error.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: --json {target}: {problem}") for line in lines)
