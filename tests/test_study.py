"""experiments/study.py: the paired bootstrap, the summary and table, the PNG writer (hand-computed numbers),
and a tiny study end to end (two rows, one seed, resumed)."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from experiments import study


def test_paired_bootstrap_hand_computed():
    users = np.array([0.0, 0.3, 0.05, 0.7, 0.2])
    # every user gains exactly 0.1: every resample's mean difference is 0.1
    difference, low, high = study.paired_bootstrap(users + 0.1, users, resamples=500)
    assert (difference, low, high) == pytest.approx((0.1, 0.1, 0.1))
    # two users with differences 0 and 1: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4,
    # so the 2.5% quantile is 0 and the 97.5% quantile is 1
    difference, low, high = study.paired_bootstrap([1.0, 1.0], [1.0, 0.0], resamples=4000, seed=3)
    assert (difference, low, high) == (0.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="same users"):
        study.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        study.paired_bootstrap([1.0, float("nan")], [1.0, 0.0])


def _record(row, seed, per_user, algorithm, mu=None, training=None):
    per_user = np.asarray(per_user, dtype=float)
    return {"row": row, "title": row.upper(), "algorithm": algorithm, "seed": seed, "mu": mu, "wall_s": 120.0,
            "test": {"ndcg@10": float(per_user.mean()), "recall@10": float(per_user.mean()) / 2},
            "per_user": {"ndcg@10": per_user.tolist(), "recall@10": (per_user / 2).tolist()},
            "selection": {"best_step": 10 * (seed + 1), "best_value": 0.1, "history": [[0, 0.1], [10, 0.2]]},
            "training": training}


def test_summarize_and_table_hand_computed():
    training = {"clip_frac": 0.02, "kl": 0.001, "ratio_min": 0.9, "ratio_max": 1.2, "ratio_mean": 1.0}
    records = [
        _record("sft", 0, [0.1, 0.2, 0.3], "sft"), _record("sft", 1, [0.3, 0.2, 0.1], "sft"),
        _record("grpo_mu1", 0, [0.3, 0.3, 0.3], "grpo", 1, training),
        _record("grpo_mu1", 1, [0.3, 0.3, 0.3], "grpo", 1, {**training, "clip_frac": 0.04, "ratio_max": 1.5}),
        _record("rank_grpo_mu1", 0, [0.4, 0.2, 0.3], "rank_grpo", 1, training),
    ]
    summary = study.summarize(records, ease_ndcg10=0.5, resamples=300)
    sft, grpo, rank = summary["sft"], summary["grpo_mu1"], summary["rank_grpo_mu1"]
    assert sft["ndcg@10"] == pytest.approx(0.2) and sft["ndcg@10_sd"] == pytest.approx(0.0)
    assert sft["seeds"] == [0, 1] and "gap_closed" not in sft and "training" not in sft
    # per user, seeds averaged: SFT (0.2, 0.2, 0.2), GRPO (0.3, 0.3, 0.3): every user gains 0.1
    assert grpo["ndcg@10_minus_sft"] == pytest.approx((0.1, 0.1, 0.1))
    assert grpo["recall@10_minus_sft"] == pytest.approx((0.05, 0.05, 0.05))
    assert grpo["gap_closed"] == pytest.approx((0.3 - 0.2) / (0.5 - 0.2))
    assert grpo["training"]["clip_frac"] == pytest.approx(0.03)
    assert (grpo["training"]["ratio_min"], grpo["training"]["ratio_max"]) == (0.9, 1.5)
    assert "ndcg@10_minus_grpo" not in grpo  # GRPO is not compared with itself
    assert rank["ndcg@10_minus_grpo"][0] == pytest.approx(0.0) and rank["ndcg@10_sd"] is None
    table = study.markdown_table(summary)
    lines = table.splitlines()
    assert len(lines) == 5 and lines[2].startswith("| SFT | 0,1 | 0.2000 ± 0.0000 | 0.1000 ± 0.0000 |")
    assert ("| GRPO_MU1 | 0,1 | 0.3000 ± 0.0000 | 0.1500 ± 0.0000 | +0.1000 [+0.1000, +0.1000] |  | 33% "
            "| 0.0300 | 0.0010 | 0.900 / 1.500 | 10,20 | 2.0 |") == lines[3]


def test_a_row_with_fewer_seeds_is_compared_at_the_seeds_it_shares():
    records = [_record("sft", 0, [0.1, 0.1], "sft"), _record("sft", 1, [0.3, 0.3], "sft"),
               _record("gspo_mu1", 1, [0.4, 0.4], "gspo", 1)]
    gspo = study.summarize(records, ease_ndcg10=0.5, resamples=200)["gspo_mu1"]
    # against SFT seed 1 alone (0.3): +0.1, not +0.2 against the mean over SFT's two seeds
    assert gspo["ndcg@10_minus_sft"] == pytest.approx((0.1, 0.1, 0.1))
    assert gspo["seeds_paired_with_sft"] == [1]
    assert gspo["gap_closed"] == pytest.approx((0.4 - 0.3) / (0.5 - 0.3))
    assert "ndcg@10_minus_grpo" not in gspo  # no GRPO row at mu 1


def test_png_bytes_follow_the_format():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # [H=2, W=3, RGB]
    data = study.png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length = int.from_bytes(data[8:12], "big")
    assert data[12:16] == b"IHDR" and length == 13
    assert int.from_bytes(data[16:20], "big") == 3 and int.from_bytes(data[20:24], "big") == 2
    assert data[24:29] == bytes([8, 2, 0, 0, 0])  # 8 bits, truecolour, deflate, filter 0, no interlace
    assert int.from_bytes(data[29:33], "big") == zlib.crc32(data[12:29])
    idat_length = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41:41 + idat_length])
    assert raw == b"\x00" + bytes(range(0, 9)) + b"\x00" + bytes(range(9, 18))
    assert data[-12:] == (0).to_bytes(4, "big") + b"IEND" + zlib.crc32(b"IEND").to_bytes(4, "big")


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resumed(tmp_path, monkeypatch, capsys):
    from test_rec_experiments import write_reddit_v2

    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no baselines file here: no "gap closed"
    data = write_reddit_v2(tmp_path / "data")
    tiny = ["sft.steps=4", "max_steps=2", "eval_every=1", "vocab_size=300", "hidden_size=32", "intermediate_size=64",
            "num_layers=1", "max_new_tokens=24"]
    argv = ["--rows", "sft,grpo_mu1,rank_grpo_mu2", "--seeds", "0", "--quick", "--data-dir", str(data),
            "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--resamples", "200"]
    for assignment in tiny:
        argv += ["--set", assignment]
    assert study.main(argv) == 0
    records = {path.name: json.loads(path.read_text()) for path in (tmp_path / "results").glob("*__seed0.json")}
    assert sorted(records) == ["grpo_mu1__seed0.json", "rank_grpo_mu2__seed0.json", "sft__seed0.json"]
    rank = records["rank_grpo_mu2__seed0.json"]
    assert "learner.ppo_epochs=2" in rank["settings"] and "learner.mini_batches=2" in rank["settings"]
    assert len(rank["per_user"]["ndcg@10"]) == 6  # the fixture's six test requests
    assert np.mean(rank["per_user"]["ndcg@10"]) == pytest.approx(rank["test"]["ndcg@10"])
    assert [step for step, _ in rank["selection"]["history"]] == [0, 1, 2]
    assert rank["training"]["steps"] == 2 and rank["training"]["ratio_min"] <= 1.0 <= rank["training"]["ratio_max"]
    assert records["sft__seed0.json"]["training"] is None
    # every RL row starts from the SFT row's checkpoint: its step-0 test numbers are the SFT row's
    assert rank["test_sft"] == records["sft__seed0.json"]["test"] == records["grpo_mu1__seed0.json"]["test_sft"]
    table = (tmp_path / "results" / "table.md").read_text()
    assert len(table.splitlines()) == 5 and "rank_grpo_mu2" not in table  # titles, not labels
    assert (tmp_path / "results" / "val_ndcg10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert study.main(argv) == 0  # resumed: every record exists, nothing runs again
    assert capsys.readouterr().out.count("record exists, skipped") == 3


@pytest.mark.slow
def test_a_finished_headline_run_is_recorded_as_the_sft_and_rank_grpo_rows(tmp_path, monkeypatch):
    from experiments import run
    from test_rec_experiments import write_reddit_v2

    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = write_reddit_v2(tmp_path / "data")
    tiny = ["sft.steps=4", "max_steps=2", "eval_every=1", "vocab_size=300", "hidden_size=32", "intermediate_size=64",
            "num_layers=1", "max_new_tokens=24"]
    sets = [part for assignment in tiny for part in ("--set", assignment)]
    headline = tmp_path / "headline"
    assert run.main(["rank_grpo_reddit", "--quick", "--data-dir", str(data), "--out", str(headline), *sets]) == 0
    results = tmp_path / "results"
    common = ["--seeds", "0", "--quick", "--data-dir", str(data), "--results", str(results), "--resamples", "100"]
    with pytest.raises(SystemExit, match="not row grpo_mu1"):  # a Rank-GRPO run is no GRPO row
        study.main(["--from-run", str(headline), "--rows", "grpo_mu1", *common])
    assert study.main(["--from-run", str(headline), "--rows", "sft,rank_grpo_mu1", "--wall-s", "1000", *common]) == 0
    sft = json.loads((results / "sft__seed0.json").read_text())
    rank = json.loads((results / "rank_grpo_mu1__seed0.json").read_text())
    evaluation = json.loads((headline / "eval.json").read_text())
    initial_model = json.loads((headline / "config.json").read_text())["initial_model"]
    sft_seconds = json.loads((Path(initial_model) / "sft_time.json").read_text())["seconds"]
    assert sft["test"] == rank["test_sft"] == evaluation["sft"] and rank["test"] == evaluation["rank_grpo"]
    assert sft["checkpoint"] == initial_model and sft["training"] is None and sft["mu"] is None
    assert (sft["wall_s"], rank["wall_s"]) == pytest.approx((sft_seconds, 1000 - sft_seconds))
    recorded_argv = json.loads((headline / "config.json").read_text())["command"][1:]  # the process's sys.argv
    assert rank["mu"] == 1 and rank["training"]["steps"] == 2
    assert rank["command"] == sft["command"] == "python -m experiments.run " + " ".join(recorded_argv)
    assert np.mean(sft["per_user"]["ndcg@10"]) == pytest.approx(sft["test"]["ndcg@10"])
    assert np.mean(rank["per_user"]["ndcg@10"]) == pytest.approx(rank["test"]["ndcg@10"])
    assert "SFT" in (results / "table.md").read_text()


def test_the_readme_table_is_regenerated_between_its_markers_only(tmp_path):
    from experiments.study import README_MARKERS, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{README_MARKERS[0]}\n| old | table |\n{README_MARKERS[1]}\nafter\n")
    assert update_readme(readme, "| new | table |\n|---|---|\n")
    assert readme.read_text() == (f"# title\nbefore\n{README_MARKERS[0]}\n| new | table |\n|---|---|\n"
                                  f"{README_MARKERS[1]}\nafter\n")
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers\n")
    assert not update_readme(unmarked, "| new |") and unmarked.read_text() == "no markers\n"


def test_the_trainers_selection_is_read_from_either_file(tmp_path):
    from experiments.run_records import read_selection

    (tmp_path / "eval.json").write_text(json.dumps({"sft": {}, "selection": {"best_step": 3}}))  # the older format
    assert read_selection(tmp_path) == {"best_step": 3}
    (tmp_path / "selection.json").write_text(json.dumps({"best_step": 7, "metric": "ndcg@10"}))
    assert read_selection(tmp_path) == {"best_step": 7, "metric": "ndcg@10"}
    (tmp_path / "eval.json").write_text(json.dumps({"sft": {}}))
    (tmp_path / "selection.json").unlink()
    assert read_selection(tmp_path) == {}


@pytest.mark.parametrize("argv, message", [
    (["--resamples", "0"], "--resamples 0: must be >= 1"),
    (["--seeds", "-1"], "--seeds '-1': write integers >= 0"),
    (["--seeds", "a,b"], "--seeds 'a,b': write integers >= 0"),
])
def test_bad_study_arguments_exit_2_before_any_run(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "run_one", lambda *arguments: pytest.fail("a run started"))
    assert study.main([*argv, "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
