"""`python -m experiments.bench SUITE [--device cpu|cuda] [--config C0|Q05] [--json PATH]`.

Suites (each prints one JSON object and a short table):

    rollout    tokens/s of the recrl sampler vs `model.generate` (same model, prompts,
               sampling settings; every row forced to the full length), plus the
               sampler's prefill vs decode time
    logprobs   time and peak memory of the chunked selective log-softmax recompute vs a
               naive `log_softmax(logits).gather` over the full [B, T, V] tensor
    step       one full GRPO step (rollout, rewards, update) with its per-phase breakdown

Configs: C0 (tiny Qwen2: hidden 256, 4 layers, 4 heads / 2 kv, intermediate 688,
vocab 4096; 4 prompts x G 8; prompt 64; 64 new tokens) and Q05 (random-initialised
Qwen2.5-0.5B shape; 8 prompts x G 8; prompt 256; 256 new tokens; bf16 on CUDA).
Timings are medians over repeats after a warm-up; compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.rollout import SamplingConfig, sample


@dataclass
class BenchConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    prompts: int
    group_size: int
    prompt_length: int
    new_tokens: int
    tie_word_embeddings: bool = True


CONFIGS = {
    "C0": BenchConfig("C0", 256, 4, 4, 2, 688, 4096, 4, 8, 64, 64),
    "Q05": BenchConfig("Q05", 896, 24, 14, 2, 4864, 151_936, 8, 8, 256, 256),
}


def build_model(config: BenchConfig, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_config = Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" and config.name == "Q05" else torch.float32
    return Qwen2ForCausalLM(hf_config).to(device=device, dtype=dtype).eval()


def make_prompts(config: BenchConfig, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (config.prompts, config.prompt_length), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    return ids.to(device), mask.to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> float:
    """Median wall time of `function()` over `repeats` runs after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recrl_sample(model, ids, mask, config: BenchConfig, max_new_tokens: int | None = None):
    # No EOS id can be sampled (-1), so every row runs to the full length, as generate does below.
    return sample(model, ids, mask, config.group_size,
                  SamplingConfig(max_new_tokens=max_new_tokens or config.new_tokens, temperature=1.0),
                  eos_token_ids=[-1], pad_token_id=0, generator=torch.Generator(device=ids.device).manual_seed(0))


# ---------------------------------------------------------------------------
def bench_rollout(config: BenchConfig, device: str, repeats: int) -> dict:
    model = build_model(config, device)
    ids, mask = make_prompts(config, device)
    tokens = config.prompts * config.group_size * config.new_tokens

    def run_generate():
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens,
                num_return_sequences=config.group_size, pad_token_id=0, eos_token_id=1,
            )

    recrl_s = timed(lambda: recrl_sample(model, ids, mask, config), device, repeats)
    generate_s = timed(run_generate, device, repeats)
    prefill_s = timed(lambda: recrl_sample(model, ids, mask, config, max_new_tokens=1), device, repeats)
    return {
        "recrl_tokens_per_s": tokens / recrl_s,
        "generate_tokens_per_s": tokens / generate_s,
        "speedup": generate_s / recrl_s,
        "recrl_seconds": recrl_s,
        "generate_seconds": generate_s,
        "prefill_seconds": prefill_s,
        "decode_seconds": recrl_s - prefill_s,
        "decode_tokens_per_s": tokens / max(recrl_s - prefill_s, 1e-9),
    }


def _logprobs_worker(args) -> tuple[float, int]:
    """Run one log-prob variant in a fresh process; return (seconds, peak extra bytes)."""
    config, device, variant, repeats = args
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    from engine.logprobs import completion_logprobs

    model = build_model(config, device)
    rows = config.prompts * config.group_size
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, config.vocab_size, (rows, config.prompt_length), generator=generator).to(device)
    completion_ids = torch.randint(2, config.vocab_size, (rows, config.new_tokens), generator=generator).to(device)
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    completion_mask = torch.ones_like(completion_ids, dtype=torch.bool)

    @torch.no_grad()
    def naive():
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        logits = model(input_ids=input_ids).logits[:, config.prompt_length - 1 : -1].float()  # [B, T, V]
        return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)

    @torch.no_grad()
    def recrl():
        return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, chunk_size=16).logprobs

    function = naive if variant == "naive" else recrl
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(function, device, repeats)
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        seconds = timed(function, device, repeats)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return seconds, int(peak)


def bench_logprobs(config: BenchConfig, device: str, repeats: int) -> dict:
    context = multiprocessing.get_context("spawn")
    results = {}
    for variant in ("naive", "recrl"):
        with context.Pool(1) as pool:
            results[variant] = pool.apply(_logprobs_worker, ((config, device, variant, repeats),))
    (naive_s, naive_peak), (recrl_s, recrl_peak) = results["naive"], results["recrl"]
    return {
        "recrl_seconds": recrl_s, "naive_seconds": naive_s,
        "recrl_peak_bytes": recrl_peak, "naive_peak_bytes": naive_peak,
        "peak_ratio": recrl_peak / max(naive_peak, 1),
        "memory_measure": "CUDA max_memory_allocated" if device == "cuda" else "process max RSS growth (fresh process)",
    }


def bench_step(config: BenchConfig, device: str, repeats: int) -> dict:
    from algorithms.grpo import GRPO
    from engine.learner import Learner, LearnerConfig, PolicyBatch

    model = build_model(config, device).float() if device == "cpu" else build_model(config, device)
    model.float()  # fp32 master weights; bf16 autocast on CUDA comes from the learner
    strategy = GRPO()
    learner = Learner(model, LearnerConfig(lr=1e-5, kl_coef=0.0, ppo_epochs=1,
                                           micro_batch_size=config.prompts * config.group_size,
                                           loss_agg_mode="token_mean"), strategy)
    ids, mask = make_prompts(config, device)
    generator = torch.Generator().manual_seed(0)
    phases: dict[str, list[float]] = {"rollout": [], "reward": [], "advantages": [], "update": []}
    totals = []
    for step in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        rollout = recrl_sample(model, ids, mask, config)
        synchronize(device)
        after_rollout = time.perf_counter()
        rewards = torch.rand(rollout.num_rows, generator=generator).to(device)
        after_reward = time.perf_counter()
        unit_ids = strategy.unit_ids(rollout, None)
        advantages = strategy.advantages(rewards, rollout, unit_ids)
        synchronize(device)
        after_advantages = time.perf_counter()
        learner.update(PolicyBatch(rollout, unit_ids, advantages))
        synchronize(device)
        end = time.perf_counter()
        if step == 0:
            continue  # warm-up
        phases["rollout"].append(after_rollout - start)
        phases["reward"].append(after_reward - after_rollout)
        phases["advantages"].append(after_advantages - after_reward)
        phases["update"].append(end - after_advantages)
        totals.append(end - start)
    return {"step_s": statistics.median(totals), "phases": {k: statistics.median(v) for k, v in phases.items()}}


SUITES = {"rollout": bench_rollout, "logprobs": bench_logprobs, "step": bench_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="C0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    config = CONFIGS[args.config]
    import transformers

    result = {
        "suite": args.suite,
        "config": asdict(config),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "repeats": args.repeats,
        **SUITES[args.suite](config, args.device, args.repeats),
    }
    text = json.dumps(result, indent=2)
    print(text)
    for key, value in result.items():
        if isinstance(value, float):
            print(f"  {key:<24} {value:,.4f}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
