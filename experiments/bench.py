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

On CUDA the rollout suite also times the sampler with CUDA graphs off (the eager
decode step, whose kernels are those of the captured static step less its bucket
mask and slot-indexed K/V writes), and sets decode against the memory-bandwidth bound:
the fewest bytes one decode step must read (every weight once, the prompt K/V once
per prompt, each row's generated K/V) over the measured device-to-device copy
bandwidth. The step suite on CUDA keeps fp32 master weights and AdamW state,
samples with a bf16 decoder and trains under bf16 autocast, as a trainer would.
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
from fastdecode import fast_decoder


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
    step_micro_batch_size: int = 32  # rows per forward/backward in the step suite (one optimizer step either way)


CONFIGS = {
    "C0": BenchConfig("C0", 256, 4, 4, 2, 688, 4096, 4, 8, 64, 64),
    "Q05": BenchConfig("Q05", 896, 24, 14, 2, 4864, 151_936, 8, 8, 256, 256, step_micro_batch_size=16),
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
    with torch.device(device):  # initialise on the device: 0.5B random weights take seconds on a CPU
        model = Qwen2ForCausalLM(hf_config)
    return model.to(dtype=dtype).eval()


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


def recrl_sample(model, ids, mask, config: BenchConfig, max_new_tokens: int | None = None, **sampling):
    # No EOS id can be sampled (-1), so every row runs to the full length, as generate does below.
    return sample(model, ids, mask, config.group_size,
                  SamplingConfig(max_new_tokens=max_new_tokens or config.new_tokens, temperature=1.0, **sampling),
                  eos_token_ids=[-1], pad_token_id=0, generator=torch.Generator(device=ids.device).manual_seed(0),
                  make_decoder=fast_decoder)


def copy_bandwidth(device: str, size_bytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s, from a large device-to-device copy (bytes read + written)."""
    source = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, repeats=10)
    return 2 * size_bytes / seconds


def decode_bytes_per_step(model, config: BenchConfig) -> float:
    """Fewest bytes one decode step reads, averaged over the steps: every weight matrix
    once (an embedding table that is not also the LM head is left out: a step reads
    only B of its rows), the prompt K/V once per prompt, and each row's generated K/V."""
    model_config = model.config
    element = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        weights -= model.get_input_embeddings().weight.numel()
    head_dim = model_config.hidden_size // model_config.num_attention_heads
    kv_per_position = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim
    rows = config.prompts * config.group_size
    prompt_kv = config.prompts * config.prompt_length * kv_per_position
    generated_kv = rows * (config.new_tokens + 1) / 2 * kv_per_position  # mean over the steps
    return float((weights + prompt_kv + generated_kv) * element)


# ---------------------------------------------------------------------------
def bench_rollout(config: BenchConfig, device: str, repeats: int, profile: bool = False) -> dict:
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
    decode_s = max(recrl_s - prefill_s, 1e-9)
    result = {
        "recrl_tokens_per_s": tokens / recrl_s,
        "generate_tokens_per_s": tokens / generate_s,
        "speedup": generate_s / recrl_s,
        "recrl_seconds": recrl_s,
        "generate_seconds": generate_s,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": tokens / decode_s,
    }
    if device == "cuda":
        eager_s = timed(lambda: recrl_sample(model, ids, mask, config, cuda_graphs=False), device, repeats)
        bandwidth = copy_bandwidth(device)
        step_bytes = decode_bytes_per_step(model, config)
        rows = config.prompts * config.group_size
        bound_step_s = step_bytes / bandwidth
        measured_step_s = decode_s / max(config.new_tokens - 1, 1)  # the first token comes from the prefill
        result.update({
            "recrl_no_graphs_tokens_per_s": tokens / eager_s,
            "cuda_graphs_speedup": eager_s / recrl_s,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "decode_bytes_per_step": step_bytes,
            "decode_step_seconds": measured_step_s,
            "decode_bound_step_seconds": bound_step_s,
            "decode_bound_tokens_per_s": rows / bound_step_s,
            "decode_fraction_of_bound": bound_step_s / measured_step_s,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        })
    if profile:
        result["profile"] = profile_rollout(model, ids, mask, config, device)
    return result


def profile_rollout(model, ids, mask, config: BenchConfig, device: str, steps: int = 16) -> dict:
    """Where a decode step's time goes: torch.profiler over a short rollout with CUDA graphs
    off (so each kernel is seen; the eager step, see the module docstring), prefill
    subtracted by profiling a 1-token rollout too."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU

    def kernels(new_tokens: int) -> dict[str, tuple[int, float]]:
        recrl_sample(model, ids, mask, config, max_new_tokens=new_tokens, cuda_graphs=False)  # warm-up
        with profile(activities=[activity]) as profiler:
            recrl_sample(model, ids, mask, config, max_new_tokens=new_tokens, cuda_graphs=False)
            synchronize(device)
        totals: dict[str, tuple[int, float]] = {}
        for event in profiler.events():
            if device == "cuda" and event.device_type.name != "CUDA":
                continue
            if device == "cpu" and event.cpu_parent is not None:  # top-level CPU ops only
                continue
            seconds = (event.device_time_total if device == "cuda" else event.cpu_time_total) * 1e-6
            count, total = totals.get(event.name, (0, 0.0))
            totals[event.name] = (count + 1, total + seconds)
        return totals

    one, many = kernels(1), kernels(steps + 1)
    per_step = {name: ((count - one.get(name, (0, 0.0))[0]) / steps, (total - one.get(name, (0, 0.0))[1]) / steps)
                for name, (count, total) in many.items()}
    top = sorted(per_step.items(), key=lambda item: -item[1][1])[:15]
    return {
        "kernels_per_decode_step": sum(count for count, _ in per_step.values()),
        "kernel_seconds_per_decode_step": sum(seconds for _, seconds in per_step.values()),
        "top_kernels_per_decode_step": [{"name": name[:120], "count": count, "seconds": seconds}
                                        for name, (count, seconds) in top],
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
        baseline = reset_peak_rss()
        seconds = timed(function, device, repeats)
        peak = peak_rss() - baseline
    return seconds, int(peak)


def _status_kilobytes(field: str) -> int | None:
    """A `VmXXX:` line of /proc/self/status in kB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset this process's peak resident memory to its current size and return that size
    in bytes. On Linux the high-water mark (VmHWM) is reset through /proc/self/clear_refs,
    so what the import and model building touched does not hide the measured peak; elsewhere
    the baseline is the lifetime maximum (`ru_maxrss`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak_rss()


def peak_rss() -> int:
    """Peak resident memory in bytes since the last `reset_peak_rss` (Linux), else over the lifetime."""
    kilobytes = _status_kilobytes("VmHWM")
    return (kilobytes if kilobytes is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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
        "memory_measure": "CUDA max_memory_allocated" if device == "cuda" else "peak RSS growth (fresh process, peak reset first)",
    }


def bench_step(config: BenchConfig, device: str, repeats: int) -> dict:
    from algorithms.grpo import GRPO
    from engine.learner import Learner, LearnerConfig, PolicyBatch, Rewards

    model = build_model(config, device).float()  # fp32 master weights; bf16 autocast on CUDA comes from the learner
    sampling = {"dtype": "bfloat16"} if device == "cuda" else {}  # a bf16 decoder snapshot on GPUs
    strategy = GRPO()
    learner = Learner(model, LearnerConfig(lr=1e-5, kl_coef=0.0, ppo_epochs=1,
                                           micro_batch_size=config.step_micro_batch_size,
                                           loss_agg_mode="token_mean"), strategy)
    ids, mask = make_prompts(config, device)
    generator = torch.Generator().manual_seed(0)
    phases: dict[str, list[float]] = {"rollout": [], "reward": [], "advantages": [], "update": []}
    totals = []
    for step in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        rollout = recrl_sample(model, ids, mask, config, **sampling)
        synchronize(device)
        after_rollout = time.perf_counter()
        rewards = Rewards.from_tensor(torch.rand(rollout.num_rows, generator=generator).to(device))
        after_reward = time.perf_counter()
        unit_ids = strategy.unit_ids(rollout, rewards)
        advantages = strategy.advantages(rewards, rollout, unit_ids)
        synchronize(device)
        after_advantages = time.perf_counter()
        learner.update(PolicyBatch(rollout, rewards, unit_ids, advantages))
        synchronize(device)
        end = time.perf_counter()
        if step == 0:
            continue  # warm-up
        phases["rollout"].append(after_rollout - start)
        phases["reward"].append(after_reward - after_rollout)
        phases["advantages"].append(after_advantages - after_reward)
        phases["update"].append(end - after_advantages)
        totals.append(end - start)
    result = {"step_s": statistics.median(totals), "phases": {k: statistics.median(v) for k, v in phases.items()},
              "micro_batch_size": config.step_micro_batch_size}
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SUITES = {"rollout": bench_rollout, "logprobs": bench_logprobs, "step": bench_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="C0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the JSON object to this file")
    parser.add_argument("--profile", action="store_true",
                        help="rollout: also profile a decode step (kernels and their time, graphs off)")
    args = parser.parse_args(argv)
    if args.profile and args.suite != "rollout":
        parser.error("--profile is a rollout option")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    config = CONFIGS[args.config]
    import transformers

    result = {
        "suite": args.suite,
        "config": asdict(config),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads, {cpu_name()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "repeats": args.repeats,
        **SUITES[args.suite](config, args.device, args.repeats, **({"profile": True} if args.profile else {})),
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
