"""experiments/bench.py: the suites run on CPU and report the keys the README and the issue name."""

import json

import pytest

from experiments import bench


def test_decode_bytes_per_step_counts_weights_and_kv_once():
    config = bench.BenchConfig("T", hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16,
                               vocab_size=32, prompts=2, group_size=2, prompt_length=4, new_tokens=3)
    model = bench.build_model(config, "cpu")
    # weights: embedding 32*8 (tied, so it is also the LM head) + q 8*8+8, k 4*8+4, v 4*8+4,
    # o 8*8, gate/up/down 3 * 8*16, two layer norms 2*8, final norm 8 = 872 parameters.
    # K/V per position: 2 (k, v) * 1 layer * 1 kv head * head_dim 4 = 8 values;
    # prompts 2 * 4 positions * 8 = 64; generated, mean over 3 steps: 4 rows * 2 * 8 = 64.
    assert bench.decode_bytes_per_step(model, config) == (872 + 64 + 64) * 4


@pytest.mark.slow
def test_suites_report_their_figures(tmp_path, capsys):
    for suite, keys in [("rollout", ["recrl_tokens_per_s", "generate_tokens_per_s", "speedup", "prefill_seconds"]),
                        ("logprobs", ["recrl_peak_bytes", "naive_peak_bytes", "peak_ratio"]),
                        ("step", ["step_s", "phases"])]:
        path = tmp_path / f"{suite}.json"
        assert bench.main([suite, "--device", "cpu", "--repeats", "1", "--json", str(path)]) == 0
        result = json.loads(path.read_text())
        assert result["suite"] == suite and result["config"]["name"] == "C0"
        for key in keys:
            assert key in result
        if suite == "rollout":
            assert result["recrl_tokens_per_s"] > 0 and result["speedup"] > 0
        if suite == "step":
            assert set(result["phases"]) == {"rollout", "reward", "advantages", "update"}
            assert result["step_s"] >= result["phases"]["update"] > 0
        if suite == "logprobs":
            assert 0 < result["recrl_peak_bytes"] < result["naive_peak_bytes"]
