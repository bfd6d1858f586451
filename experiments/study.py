"""`python -m experiments.study`: the recommendation study behind README "Results" (issue 15).

What runs. Each row of `ROWS` is one registry experiment with a few `--set` assignments, run
once per seed as `python -m experiments.run EXPERIMENT --set seed=S --set ...` (in this
process): the SFT warm start alone, and GRPO (token credit unit), GSPO (sequence unit) and
Rank-GRPO (rank unit) at ppo_epochs mu in {1, 2, 4}. Every RL row takes 2 mini-batches per
pass, so the second mini-batch of each pass and all later passes are off-policy and the
importance ratio of the unit (token ratio, geometric mean over the sequence, geometric mean
over one list item) acts. One more row is Rank-GRPO with the paper's aggregation
(`seq_mean_unit_mean`; the grid uses the official code's `token_mean`) at the mu whose
Rank-GRPO row has the best mean validation NDCG@10; it runs after the grid's Rank-GRPO rows.
All RL runs of a seed start from the SFT row's checkpoint of that seed (`--model` it with
sft.steps=0), so every row of a seed shares one warm start and the SFT row is its step 0.

Resuming. The grid runs seed by seed, and each run's record is written to
`RESULTS/<row>__seed<S>.json` the moment it ends: an interrupted study keeps its finished
runs, and a rerun skips every run whose record exists (an unfinished run directory is
started afresh).

A record holds the test metrics of the checkpoint the trainer chose on validation NDCG@10
and of the last step, the validation history, training statistics from metrics.jsonl (clip
fraction, k3 KL to the SFT model, the ratio's min / mean / max, rewards, timings), the wall
time, and the chosen checkpoint's NDCG@10 and Recall@10 per test user, decoded again here
(greedy, the trainer's batch size, so the mean reproduces eval.json; checked).

Statistics (`summarize`):

    seed spread      mean and sample standard deviation over seeds of a row's test metric
    paired bootstrap x_u, y_u = the two rows' metric of test user u, each averaged over the
                     seeds both rows have (a row with fewer seeds is compared at those);
                     d = mean_u (x_u - y_u) and its 95% percentile bootstrap interval over
                     B = 10,000 resamples of the users (experiments/statistics.py)
    gap closed       (N@10(row) - N@10(SFT)) / (N@10(EASE) - N@10(SFT)) at the shared seeds,
                     EASE from experiments/results/baselines_ml100k.json

Outputs in RESULTS: the run records, `summary.json`, `table.md` (the README table text, also
printed, and written into README.md between its study-table markers when RESULTS is the default) and `val_ndcg10.png`: validation NDCG@10 over RL steps (mean over seeds) of the plotted
rows, drawn with numpy and written as a PNG with zlib (signature, IHDR, IDAT = zlib of each RGB
row behind a filter byte 0, IEND; W3C PNG specification, 2nd ed., sections 5 and 11).

    python -m experiments.study                      # the whole grid, 3 seeds, then the table
    python -m experiments.study --rows sft,grpo_mu1 --seeds 0
    python -m experiments.study --report-only        # the table and plot from the records alone

Adopting a finished run. `--from-run RUN_DIR --rows sft,rank_grpo_mu1 --seeds 0` records a run
of `python -m experiments.run rank_grpo_reddit --out RUN_DIR` (the headline: the study's
rank_grpo_mu1 row at seed 0, SFT stage included) as those rows instead of running them: the
SFT row gets the cached warm start it started from (wall time = its SFT training time,
sft_time.json), the RL row the run itself (wall time = `--wall-s`, the whole command's, less
the SFT time; without `--wall-s`, from config.json's to eval.json's modification time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.logging import read_metrics
from experiments.run_records import read_selection
from experiments.statistics import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS = ROOT / "experiments" / "results" / "study"
RUNS = Path("runs/study")
EASE_RESULTS = ROOT / "experiments" / "results" / "baselines_ml100k.json"
README = ROOT / "README.md"
MUS = (1, 2, 4)
MINI_BATCHES = 2
PAPER_AGGREGATION = "seq_mean_unit_mean"
BEST_MU = "best"  # a row's mu resolved from the Rank-GRPO rows' validation NDCG@10


@dataclass(frozen=True)
class Row:
    label: str  # file names and the table's key
    title: str  # the table's text
    experiment: str  # a name of experiments.registry.EXPERIMENTS
    settings: tuple[str, ...] = ()  # --set assignments on top of the experiment's
    mu: int | str | None = None  # ppo_epochs (with MINI_BATCHES mini-batches); BEST_MU; None = the experiment's
    algorithm: str = "sft"  # grpo | gspo | rank_grpo | sft: the plot's colour and the comparison row's family


def study_rows() -> list[Row]:
    rows = [Row("sft", "SFT (EASE-teacher lists)", "sft_reddit")]
    for algorithm, experiment, title in (("grpo", "grpo_reddit", "GRPO (token)"),
                                         ("gspo", "gspo_reddit", "GSPO (sequence)"),
                                         ("rank_grpo", "rank_grpo_reddit", "Rank-GRPO (rank, token_mean)")):
        rows += [Row(f"{algorithm}_mu{mu}", f"{title}, mu={mu}", experiment, (), mu, algorithm) for mu in MUS]
    rows.append(Row("rank_grpo_paper_agg", f"Rank-GRPO (rank, {PAPER_AGGREGATION})", "rank_grpo_reddit",
                    (f"learner.loss_agg_mode={PAPER_AGGREGATION}",), BEST_MU, "rank_grpo"))
    return rows


ROWS = {row.label: row for row in study_rows()}
PLOTTED = tuple(f"{algorithm}_mu{mu}" for mu in MUS for algorithm in ("grpo", "gspo", "rank_grpo"))


# ---------------------------------------------------------------------------
# statistics and the table
# ---------------------------------------------------------------------------


def _mean_over_seeds(records: list[dict], metric: str) -> np.ndarray:
    return np.mean([record["per_user"][metric] for record in records], axis=0)  # [U]


def _common_seeds(runs: list[dict], reference: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs of both rows at the seeds they share (a comparison pairs users *and* seeds)."""
    shared = {r["seed"] for r in runs} & {r["seed"] for r in reference}
    return [r for r in runs if r["seed"] in shared], [r for r in reference if r["seed"] in shared]


def summarize(records: list[dict], ease_ndcg10: float | None = None, resamples: int = 10_000) -> dict:
    """Per row: seeds, test N@10 / R@10 (mean, sd over seeds), bootstrap intervals against SFT and
    against GRPO at the same mu, gap closed, and the training statistics averaged over seeds."""
    by_row: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        by_row.setdefault(record["row"], []).append(record)
    summary = {}
    for label, runs in by_row.items():
        entry = {"title": runs[0]["title"], "seeds": [r["seed"] for r in runs], "mu": runs[0].get("mu")}
        for metric in ("ndcg@10", "recall@10"):
            values = [r["test"][metric] for r in runs]
            entry[metric] = float(np.mean(values))
            entry[f"{metric}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        references = {"sft": by_row.get("sft")}
        if runs[0]["algorithm"] not in ("sft", "grpo"):
            references["grpo"] = by_row.get(f"grpo_mu{runs[0].get('mu')}")
        for name, reference in references.items():
            if reference and label != name:
                mine, theirs = _common_seeds(runs, reference)
                if not mine:
                    continue
                entry[f"seeds_paired_with_{name}"] = [r["seed"] for r in mine]
                for metric in ("ndcg@10", "recall@10"):
                    entry[f"{metric}_minus_{name}"] = paired_bootstrap(
                        _mean_over_seeds(mine, metric), _mean_over_seeds(theirs, metric), resamples)
                if name == "sft" and ease_ndcg10 is not None:
                    row_mean, sft = (float(np.mean([r["test"]["ndcg@10"] for r in part])) for part in (mine, theirs))
                    entry["gap_closed"] = (row_mean - sft) / (ease_ndcg10 - sft)
        trainings = [r["training"] for r in runs if r.get("training")]
        if trainings:
            entry["training"] = {key: float(np.mean([t[key] for t in trainings])) for key in trainings[0]}
            entry["training"]["ratio_min"] = min(t["ratio_min"] for t in trainings)
            entry["training"]["ratio_max"] = max(t["ratio_max"] for t in trainings)
        entry["wall_s"] = float(np.mean([r["wall_s"] for r in runs]))
        entry["best_step"] = [r["selection"]["best_step"] for r in runs] if runs[0].get("selection") else None
        summary[label] = entry
    return summary


def _interval(value) -> str:
    return "" if value is None else f"{value[0]:+.4f} [{value[1]:+.4f}, {value[2]:+.4f}]"


def markdown_table(summary: dict, order: list[str] | None = None) -> str:
    """The README table: one line per row of `summary`, in `order` (default ROWS order)."""
    order = [label for label in (order or list(ROWS)) if label in summary]
    order += [label for label in summary if label not in order]
    lines = ["| row | seeds | N@10 | R@10 | N@10 - SFT [95% CI] | N@10 - GRPO same mu [95% CI] | gap closed "
             "| clip frac | KL | ratio min / max | best step | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in order:
        entry = summary[label]
        spread = lambda metric: f" ± {entry[metric + '_sd']:.4f}" if entry.get(metric + "_sd") is not None else ""
        training = entry.get("training")
        cells = [
            entry["title"], ",".join(str(s) for s in entry["seeds"]),
            f"{entry['ndcg@10']:.4f}{spread('ndcg@10')}", f"{entry['recall@10']:.4f}{spread('recall@10')}",
            _interval(entry.get("ndcg@10_minus_sft")), _interval(entry.get("ndcg@10_minus_grpo")),
            f"{entry['gap_closed']:.0%}" if "gap_closed" in entry else "",
            f"{training['clip_frac']:.4f}" if training else "", f"{training['kl']:.4f}" if training else "",
            f"{training['ratio_min']:.3f} / {training['ratio_max']:.3f}" if training else "",
            ",".join(str(s) for s in entry["best_step"]) if entry.get("best_step") else "",
            f"{entry['wall_s'] / 60:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# the plot: numpy raster, zlib PNG
# ---------------------------------------------------------------------------

# 3x5 glyphs, one octal digit per row (bit 4 = left column)
GLYPHS = {"0": "75557", "1": "26227", "2": "71747", "3": "71717", "4": "55711", "5": "74717", "6": "74757",
          "7": "71111", "8": "75757", "9": "75717", ".": "00002", "-": "00700", "_": "00007", " ": "00000",
          "=": "07070", "a": "25755", "b": "65656", "c": "34443", "d": "65556", "e": "74647", "f": "74644",
          "g": "34553", "h": "55755", "i": "72227", "k": "55655", "l": "44447", "m": "57555", "n": "65555",
          "o": "25552", "p": "65644", "r": "65655", "s": "34216", "t": "72222", "u": "55557", "v": "55552",
          "@": "25742", "y": "55222", "w": "55575", "x": "55255", "q": "25561", "j": "11152", "z": "71247",
          "(": "12221", ")": "42224", ",": "00024", "/": "11244"}
COLOURS = {"grpo": (31, 119, 180), "gspo": (44, 160, 44), "rank_grpo": (214, 39, 40), "sft": (120, 120, 120)}


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of `image` [H, W, 3] uint8."""
    height, width, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)  # filter 0
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def _text(image: np.ndarray, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 2) -> None:
    for character in text.lower():
        glyph = GLYPHS.get(character, GLYPHS[" "])
        for row, octal in enumerate(glyph):
            for column in range(3):
                if int(octal, 8) >> (2 - column) & 1:
                    top, left = y + row * scale, x + column * scale
                    image[top:top + scale, left:left + scale] = colour
        x += 4 * scale


def _line(image: np.ndarray, x0, y0, x1, y1, colour, dash: int = 0, width: int = 2) -> None:
    """A line `width` pixels wide; `dash` > 0 draws `dash` pixels, skips `dash`, and so on."""
    count = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for position, (x, y) in enumerate(zip(np.linspace(x0, x1, count), np.linspace(y0, y1, count))):
        if dash and (position // dash) % 2:
            continue
        top, left = int(round(y)) - width // 2, int(round(x)) - width // 2
        image[max(top, 0):top + width, max(left, 0):left + width] = colour


def plot_validation(records: list[dict], path: Path, rows: tuple[str, ...] = PLOTTED, size=(720, 420)) -> list[str]:
    """Validation NDCG@10 over steps, mean over seeds, for the `rows` present; mu=1 solid, 2 dashed, 4 dotted.
    Returns the plotted row labels."""
    curves = {}
    for label in rows:
        histories = [dict(map(tuple, r["selection"]["history"])) for r in records if r["row"] == label]
        if histories:
            steps = sorted(set.intersection(*(set(h) for h in histories)))
            curves[label] = (steps, [float(np.mean([h[s] for h in histories])) for s in steps])
    width, height = size
    image = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, width - 190, 20, height - 40
    if curves:
        max_step = max(max(steps) for steps, _ in curves.values()) or 1
        values = [v for _, vs in curves.values() for v in vs]
        low, high = min(values), max(values)
        low, high = low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3)
        to_x = lambda step: left + (right - left) * step / max_step
        to_y = lambda value: bottom - (bottom - top) * (value - low) / (high - low)
        for tick in np.linspace(low, high, 5):
            _line(image, left, to_y(tick), right, to_y(tick), (225, 225, 225), width=1)
            _text(image, 4, int(to_y(tick)) - 5, f"{tick:.3f}")
        for tick in np.linspace(0, max_step, 5):
            _text(image, int(to_x(tick)) - 8, bottom + 8, f"{int(round(tick))}")
        for position, (label, (steps, values)) in enumerate(curves.items()):
            algorithm = next((r["algorithm"] for r in records if r["row"] == label), "sft")
            colour, dash = COLOURS.get(algorithm, (0, 0, 0)), {"mu1": 0, "mu2": 6}.get(label[-3:], 2)
            for (s0, v0), (s1, v1) in zip(zip(steps, values), zip(steps[1:], values[1:])):
                _line(image, to_x(s0), to_y(v0), to_x(s1), to_y(v1), colour, dash)
            _line(image, right + 12, top + 12 + 20 * position, right + 40, top + 12 + 20 * position, colour, dash)
            _text(image, right + 46, top + 7 + 20 * position, label)
    _line(image, left, top, left, bottom, (0, 0, 0), width=1)
    _line(image, left, bottom, right, bottom, (0, 0, 0), width=1)
    _text(image, left, height - 16, "val ndcg@10 over rl steps (mean over seeds)")
    path.write_bytes(png_bytes(image))
    return list(curves)


# ---------------------------------------------------------------------------
# running and recording
# ---------------------------------------------------------------------------


def training_statistics(metrics_path: Path) -> dict | None:
    """Means over the RL steps of metrics.jsonl (clip fraction, KL, ratio, rewards, timings), ratio extremes;
    None without RL steps."""
    if not metrics_path.exists():
        return None
    steps = [row for row in read_metrics(metrics_path)
             if not row.get("eval") and row.get("reward_mean") is not None and "clip_frac" in row]
    if not steps:
        return None
    mean = lambda key, part=None: float(np.mean([row[key] for row in (part or steps)]))
    tenth = max(len(steps) // 10, 1)
    return {"steps": len(steps), "clip_frac": mean("clip_frac"), "kl": mean("kl"), "kl_last_tenth": mean("kl", steps[-tenth:]),
            "ratio_mean": mean("ratio_mean"), "ratio_min": min(row["ratio_min"] for row in steps),
            "ratio_max": max(row["ratio_max"] for row in steps), "entropy_first_tenth": mean("entropy", steps[:tenth]),
            "entropy_last_tenth": mean("entropy", steps[-tenth:]), "reward_first_tenth": mean("reward_mean", steps[:tenth]),
            "reward_last_tenth": mean("reward_mean", steps[-tenth:]), "time_rollout_s": mean("time_rollout_s"),
            "time_learn_s": mean("time_learn_s")}


class PerUserEvaluator:
    """Per-user test metrics of a checkpoint, decoded greedily as the trainer does (tasks built once)."""

    def __init__(self, data_dir: str | None):
        self.data_dir, self.tasks = data_dir, {}

    def __call__(self, config, checkpoint: Path) -> dict[str, list[float]]:
        import dataclasses

        from engine.trainer import completion_stop_ids, greedy_generate
        from experiments.run import build_policy, build_task
        from fastdecode import fast_decoder

        key = json.dumps(dataclasses.asdict(config.task), sort_keys=True)
        if key not in self.tasks:
            self.tasks[key] = build_task(config, self.data_dir)
        task, corpus, _, _ = self.tasks[key]
        model, tokenizer = build_policy(config, task, corpus, str(checkpoint))
        stop_ids = completion_stop_ids(task, tokenizer, model)
        metrics, _ = task.example_metrics(lambda chats, prompt_indices=None, logits_hook=None: greedy_generate(
            model, tokenizer, chats, config.sampling.max_new_tokens, config.trainer.max_prompt_length,
            config.trainer.eval_batch_size, stop_ids, fast_decoder, prompt_indices, logits_hook), "test")
        return {name: [m[name] for m in metrics] for name in ("ndcg@10", "recall@10")}


def best_mu(results: Path, seed: int) -> int | None:
    """The mu of the Rank-GRPO row with the best mean validation NDCG@10 (chosen checkpoints) over the seeds
    run so far for every mu, or None while a mu has no record for `seed`."""
    values = {}
    for mu in MUS:
        records = [json.loads(p.read_text()) for p in sorted(results.glob(f"rank_grpo_mu{mu}__seed*.json"))]
        if not any(r["seed"] == seed for r in records):
            return None
        values[mu] = np.mean([r["selection"]["best_value"] for r in records])
    return max(values, key=values.get)


def sft_checkpoint(row: Row, seed: int, args, evaluate: PerUserEvaluator) -> str:
    """The SFT checkpoint of `seed` (the "sft" row's record; that row runs first if it has none).

    RL rows load it with --model and sft.steps=0: the SFT cache key of experiments/run.py covers
    the whole task config, reward kind included, so GRPO's and Rank-GRPO's experiments would
    otherwise each train their own (identical) warm start."""
    path = args.results / f"sft__seed{seed}.json"
    record = json.loads(path.read_text()) if path.exists() else run_one(ROWS["sft"], seed, args, evaluate)
    if not Path(record["checkpoint"]).is_dir():
        raise SystemExit(f"study: the SFT checkpoint {record['checkpoint']} of seed {seed} is gone (cache cleared?); "
                         f"delete {path} to train it again")
    return record["checkpoint"]


def run_one(row: Row, seed: int, args, evaluate: PerUserEvaluator) -> dict | None:
    """Run one (row, seed), write its record and return it; None when the row cannot run yet."""
    from experiments import run

    mu = best_mu(args.results, seed) if row.mu == BEST_MU else row.mu
    if row.mu == BEST_MU and mu is None:
        print(f"study: {row.label} seed {seed} waits for every rank_grpo_mu* record of seed {seed}")
        return None
    settings = list(row.settings) + ([f"learner.ppo_epochs={mu}", f"learner.mini_batches={MINI_BATCHES}"]
                                     if mu is not None else [])
    run_dir = args.runs / f"{row.label}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts afresh
    argv = [row.experiment, "--out", str(run_dir), "--set", f"seed={seed}"]
    if row.algorithm != "sft":  # start from the SFT row's checkpoint of this seed
        argv += ["--model", sft_checkpoint(row, seed, args, evaluate), "--set", "sft.steps=0"]
    for assignment in settings + list(args.set):
        argv += ["--set", assignment]
    argv += (["--quick"] if args.quick else []) + (["--data-dir", args.data_dir] if args.data_dir else [])
    print(f"study: {row.label} seed {seed}: python -m experiments.run {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    if run.main(argv) != 0:
        raise SystemExit(f"study: the run of {row.label} seed {seed} failed (arguments above)")
    return record_run(row, seed, run_dir, "python -m experiments.run " + " ".join(argv),
                      time.perf_counter() - start, mu, settings + list(args.set), args, evaluate)


def record_run(row: Row, seed: int, run_dir: Path, command: str, wall: float, mu: int | None, settings: list[str],
               args, evaluate: PerUserEvaluator) -> dict:
    """Write and return the record of the finished run in `run_dir` as (row, seed).

    The "sft" row also accepts an RL run: its record is then the run's warm start (the test
    numbers eval.json keeps under "sft", the checkpoint config.json names as initial_model), so
    the headline command's run yields both the SFT and its RL row without training anything twice."""
    from experiments import run

    stored = json.loads((run_dir / "config.json").read_text())
    config = run.stored_config(stored)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    if config.kind == "sft":
        test, last, selection, checkpoint = evaluation["sft"], None, None, Path(stored["sft_checkpoint"])
    elif row.algorithm == "sft":
        if "sft" not in evaluation:
            raise SystemExit(f"study: {run_dir} started from no SFT stage (eval.json has no 'sft'); it cannot be "
                             f"recorded as the sft row")
        test, last, selection, checkpoint = evaluation["sft"], None, None, Path(stored["initial_model"])
    else:
        test, last = evaluation[config.algorithm], evaluation[f"{config.algorithm}/last"]
        selection = read_selection(run_dir)
        if not selection:
            raise SystemExit(f"study: {run_dir} has no selection.json (a run that did not finish); resume it first")
        checkpoint = run_dir / "checkpoints" / "best"
    if row.algorithm not in ("sft", config.algorithm):
        raise SystemExit(f"study: {run_dir} ran {config.algorithm}, not the {row.algorithm} of row {row.label}")
    per_user = evaluate(config, checkpoint)
    if abs(float(np.mean(per_user["ndcg@10"])) - test["ndcg@10"]) > 1e-6:
        print(f"study: warning: {row.label} seed {seed}: per-user NDCG@10 mean {np.mean(per_user['ndcg@10']):.6f} "
              f"differs from eval.json {test['ndcg@10']:.6f}")
    record = {"row": row.label, "title": row.title, "algorithm": row.algorithm, "experiment": row.experiment,
              "seed": seed, "mu": mu, "settings": settings, "quick": args.quick,
              "command": command, "wall_s": wall, "test": test,
              "test_last": last, "test_sft": evaluation.get("sft", evaluation.get("initial")), "selection": selection,
              "checkpoint": str(checkpoint),
              "training": None if row.algorithm == "sft" else training_statistics(run_dir / "metrics.jsonl"),
              "per_user": per_user}
    path = args.results / f"{row.label}__seed{seed}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(path)
    for folder in (run_dir / "checkpoints").glob("step_*"):  # keep checkpoints/best only
        shutil.rmtree(folder, ignore_errors=True)
    return record


def adopt_run(run_dir: Path, labels: list[str], seed: int, args) -> None:
    """Record the finished run in `run_dir` as the rows `labels` of `seed` (module docstring, "Adopting")."""
    stored = json.loads((run_dir / "config.json").read_text())
    command = "python -m experiments.run " + " ".join(stored["command"][1:])
    initial = stored.get("initial_model")
    sft_time = Path(initial) / "sft_time.json" if initial else None
    sft_seconds = json.loads(sft_time.read_text())["seconds"] if sft_time and sft_time.exists() else 0.0
    if args.wall_s is not None:
        rl_seconds = args.wall_s - sft_seconds
    else:
        rl_seconds = (run_dir / "eval.json").stat().st_mtime - (run_dir / "config.json").stat().st_mtime
    evaluate = PerUserEvaluator(args.data_dir)
    for label in labels:
        row = ROWS[label]
        mu = None if row.algorithm == "sft" else stored["config"]["learner"]["ppo_epochs"]
        learner = stored["config"]["learner"]
        if stored["config"]["seed"] != seed:
            raise SystemExit(f"study: {run_dir} ran seed {stored['config']['seed']}, not --seeds {seed}")
        if row.algorithm != "sft" and (stored["config"]["name"] != row.experiment or mu != row.mu
                                       or learner["mini_batches"] != MINI_BATCHES):
            raise SystemExit(f"study: {run_dir} ran {stored['config']['name']} at ppo_epochs={mu} with "
                             f"{learner['mini_batches']} mini-batches, not row {label} ({row.experiment}, "
                             f"mu={row.mu}, {MINI_BATCHES} mini-batches)")
        print(f"study: {label} seed {seed}: recorded from {run_dir}", flush=True)
        record_run(row, seed, run_dir, command, sft_seconds if row.algorithm == "sft" else rl_seconds, mu,
                   [] if row.algorithm == "sft" else list(row.settings), args, evaluate)


README_MARKERS = ("<!-- study table: written by python -m experiments.study -->", "<!-- end of study table -->")


def update_readme(readme: Path, table: str) -> bool:
    """Put `table` between README_MARKERS in `readme` (True), or leave a file without them alone (False)."""
    text = readme.read_text() if readme.exists() else ""
    start = text.find(README_MARKERS[0])
    end = text.find(README_MARKERS[1], start) if start >= 0 else -1
    if start < 0 or end < 0:
        return False
    readme.write_text(text[:start + len(README_MARKERS[0])] + "\n" + table.rstrip("\n") + "\n" + text[end:])
    return True


def report(results: Path, resamples: int = 10_000) -> str:
    """summary.json, table.md and val_ndcg10.png from the records in `results`; returns the table."""
    records = [json.loads(path.read_text()) for path in sorted(results.glob("*__seed*.json"))]
    ease = json.loads(EASE_RESULTS.read_text())["ease"]["ndcg@10"] if EASE_RESULTS.exists() else None
    summary = summarize(records, ease, resamples)
    table = markdown_table(summary)
    plotted = plot_validation(records, results / "val_ndcg10.png")
    (results / "summary.json").write_text(json.dumps({"ease_ndcg@10": ease, "rows": summary, "plotted": plotted},
                                                     indent=1))
    (results / "table.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="all", help=f"'all' or a comma list of {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"records, table, plot (default {RESULTS})")
    parser.add_argument("--runs", type=Path, default=RUNS, help=f"run directories (default {RUNS})")
    parser.add_argument("--data-dir", help="data folder (else $RECRL_DATA_DIR, else ~/.cache/recrl)")
    parser.add_argument("--quick", action="store_true", help="every run with its experiment's --quick settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--report-only", action="store_true", help="only the table and plot from existing records")
    parser.add_argument("--from-run", type=Path, help="record this finished run directory as --rows (one seed) "
                                                      "instead of running them (module docstring)")
    parser.add_argument("--wall-s", type=float, help="with --from-run: the run command's wall time in seconds")
    args = parser.parse_args(argv)
    labels = list(ROWS) if args.rows == "all" else [label.strip() for label in args.rows.split(",")]
    unknown = [label for label in labels if label not in ROWS]
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(seed < 0 for seed in seeds):
        print(f"error: --seeds {args.seeds!r}: write integers >= 0 separated by commas, e.g. 0,1,2", file=sys.stderr)
        return 2
    if args.resamples < 1:
        print(f"error: --resamples {args.resamples}: must be >= 1 (the paired bootstrap draws that many)",
              file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    if args.from_run is not None:
        if len(seeds) != 1 or not (args.from_run / "eval.json").exists():
            print(f"error: --from-run needs one seed and a finished run directory (with eval.json): got seeds "
                  f"{args.seeds!r} and {args.from_run}", file=sys.stderr)
            return 2
        adopt_run(args.from_run, labels, seeds[0], args)
    elif not args.report_only:
        evaluate = PerUserEvaluator(args.data_dir)
        for seed in seeds:
            for label in labels:
                if (args.results / f"{label}__seed{seed}.json").exists():
                    print(f"study: {label} seed {seed}: record exists, skipped")
                    continue
                run_one(ROWS[label], seed, args, evaluate)
    table = report(args.results, args.resamples)
    print(table)
    if args.results.resolve() == RESULTS.resolve() and update_readme(README, table):
        print(f"study: the table in {README} is regenerated from the records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
