"""`python -m experiments.bench SUITE [--device cpu|cuda] [--config C0|Q05] [--repeats N] [--clock wall|cpu]
[--profile] [--bf16] [--default-allocator] [--json PATH]` and
`python -m experiments.bench breakdown RUN_DIR [--json PATH]`.

Suites (each prints one JSON object and a table of each timed part against its floor):

    rollout    tokens/s of the recrl sampler vs `model.generate` (same model, prompts,
               sampling settings; every row forced to the full length), plus the
               sampler's prefill vs decode time
    logprobs   time and peak memory of the chunked selective log-softmax recompute vs a
               naive `log_softmax(logits).gather` over the full [B, T, V] tensor
    step       one full GRPO step (rollout, rewards, update) with its per-phase breakdown and
               the update's minor page faults (fresh host pages the kernel zero-fills);
               `--profile`: where one update's time goes, op by op (torch.profiler)

Configs: C0 (tiny Qwen2: hidden 256, 4 layers, 4 heads / 2 kv, intermediate 688,
vocab 4096; 4 prompts x G 8; prompt 64; 64 new tokens) and Q05 (random-initialised
Qwen2.5-0.5B shape; 8 prompts x G 8; prompt 256; 256 new tokens; bf16 on CUDA).

Timing. The parts of a suite are timed in interleaved rounds (one call of each per
round, after a warm-up round), so load from other processes falls on all of them
alike; medians are reported, and each ratio (speed-up, fraction of the floor) is
taken per round, with its median and its range over the rounds. Compare ratios,
not absolute rates across runs. `--clock cpu` (with OMP_NUM_THREADS=1) times the
process's CPU seconds instead of wall seconds: on a machine shared with other
jobs a waiting thread costs nothing there, where two threads that wait on each
other at every parallel region inflate wall time many times over.

The floor. Each timed part is set against the least time its floating-point work
could take on this machine: the matrix products it must compute, counted from the
model config, each timed alone on this machine at the same shape and precision
(`Matmul`, `ProductTimer`), summed. Per token of a forward over n positions, for
each of the L layers (hidden d, H query and K key/value heads of size D,
intermediate I):

    projections   2 d (H + 2K) D  +  2 H D d  +  2 d 2I  +  2 I d      (qkv, o, gate/up, down)
    attention     2 H D c  (scores)  +  2 H D c  (mix)   with c the keys it attends to

and the LM head 2 d V only at the positions whose logits are needed. A causal
forward over n positions attends to sum c = n (n + 1) / 2 keys per sequence (the
attention products are timed over the full n x n square and counted at
(n + 1) / 2n of it). The backward of each product A @ B computes dA = dC @ B^T and
dB = A^T @ dC, twice the forward's work (every weight is trained, the embedding
too). Per suite:

    rollout   prefill of the P prompts (LM head at their last position) + T - 1
              decode steps of B = P G rows (the first token comes from the prefill),
              step j attending to S + j keys
    logprobs  forward over B rows of S + T positions, LM head at the T positions that
              predict completion tokens, in the recompute's chunks
    update    that forward and its backward (on-policy GRPO: one pass)
    step      rollout + update

Each product is timed alone, in a loop that keeps its operands hot in the caches, so
the floor is optimistic where a step streams its weights from memory once. Counted
as at least the stock forward computes it: every layer runs over every
position (the last layer's work on prompt positions beyond their keys and values,
and the last position's, feed nothing, and a custom forward could skip them).
Not counted: element-wise work, softmax, sampling, the optimizer (memory-bound
passes, no products). On CPU in fp32 a forward product by a weight is timed both
through `torch.matmul` (MKL) and through oneDNN with the weight prepacked (what the
fast decoder uses), and the faster counts. On CUDA a decode step's floor is the
larger of its product time and the memory-bandwidth bound: the fewest bytes one
decode step must read (every weight once, the prompt K/V once per prompt, each
row's generated K/V) over the measured device-to-device copy bandwidth. The CUDA
rollout suite also times the sampler with CUDA graphs off (the eager decode step,
whose kernels are those of the captured static step less its bucket mask and
slot-indexed K/V writes) and with the captured step's element-wise chains fused
(`sampling.compile_decode`; its first rollout, which compiles, is timed apart), and
counts the graphs a rollout captures and the host time they take. The step suite on
CUDA keeps fp32 master weights and AdamW state, samples with a bf16 decoder and trains
under bf16 autocast, as a trainer would; `--bf16` does the same on CPU.

Host memory. Like `experiments.run`, the bench first keeps freed host memory in the process
(`engine/host_memory.py`: glibc's mmap and trim thresholds raised), so that a CPU step reuses
the pages the last one freed; `--default-allocator` keeps glibc's defaults, to measure what
that saves (the step suite's page faults per update show it directly).

`breakdown RUN_DIR` splits the wall time of a finished run into SFT, rollout,
reward, update and evaluation, from the run directory (`metrics.jsonl`'s
time_*_s, the SFT checkpoint's `sft_time.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from engine.host_memory import retain_freed_memory
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
    logits_chunk_size: int = 128  # completion positions per LM-head chunk in the step suite's update

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size


CONFIGS = {
    "C0": BenchConfig("C0", 256, 4, 4, 2, 688, 4096, 4, 8, 64, 64),
    "Q05": BenchConfig("Q05", 896, 24, 14, 2, 4864, 151_936, 8, 8, 256, 256, step_micro_batch_size=16),
}
LOGPROBS_CHUNK_SIZE = 16  # the logprobs suite's recompute chunk


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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Clock:
    """Reads time on `device`, synchronising a GPU first: wall time, or ("cpu") the process's
    CPU time, which counts every thread's seconds (spin-waits too), so it measures work only
    with one thread; there, other processes' load barely changes it."""

    device: str
    kind: str = "wall"

    def now(self) -> float:
        synchronize(self.device)
        return CLOCKS[self.kind]()

    def seconds(self, function: Callable[[], object]) -> float:
        """Time of one call of `function`."""
        start = self.now()
        function()
        return self.now() - start


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every measure (a callable returning seconds) once per round, in turn, for `repeats`
    rounds after one warm-up round; returns each measure's seconds, round by round."""
    for measure in measures.values():
        measure()
    seconds: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            seconds[name].append(measure())
    return seconds


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Median and range over the rounds of the per-round ratio numerator / denominator."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def recrl_sample(model, ids, mask, config: BenchConfig, max_new_tokens: int | None = None,
                 decoders: list | None = None, **sampling):
    """The recrl sampler over the fast decoder; `decoders`: a list left holding the decoder it made
    (only the latest, so that earlier rollouts' caches and graphs are freed, not kept alive)."""
    def make_decoder(*args):
        decoder = fast_decoder(*args)
        if decoders is not None:
            decoders[:] = [decoder]
        return decoder

    # No EOS id can be sampled (-1), so every row runs to the full length, as generate does below.
    return sample(model, ids, mask, config.group_size,
                  SamplingConfig(max_new_tokens=max_new_tokens or config.new_tokens, temperature=1.0, **sampling),
                  eos_token_ids=[-1], pad_token_id=0, generator=torch.Generator(device=ids.device).manual_seed(0),
                  make_decoder=make_decoder)


# ---------------------------------------------------------------------------
# the floor: the matrix products of a suite, counted from the config, timed alone
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Matmul:
    """`count` calls of the product [batch x] [m, k] @ [k, n].

    `layout`: which operands are read transposed ("nt": the second, as `F.linear` reads its
    weight [n, k]). `useful`: the fraction of the m k n multiply-adds that count (causal
    attention over N positions: (N + 1) / 2N). `weight`: the second operand is a weight
    matrix of a forward (it may be prepacked)."""

    name: str
    m: int
    k: int
    n: int
    batch: int = 1
    count: int = 1
    layout: str = "nn"
    useful: float = 1.0
    weight: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.count * self.useful

    @property
    def shape(self) -> tuple:
        return self.batch, self.m, self.k, self.n, self.layout, self.weight


def total_flops(products: list[Matmul]) -> float:
    return sum(product.flops for product in products)


def layer_products(config: BenchConfig, tokens: int, count: int) -> list[Matmul]:
    """The weight products of one pass of `tokens` tokens through every layer, `count` times."""
    hidden, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    layers, intermediate = config.num_layers * count, config.intermediate_size
    return [
        Matmul("qkv", tokens, hidden, (heads + 2 * kv_heads) * head_dim, count=layers, layout="nt", weight=True),
        Matmul("o", tokens, heads * head_dim, hidden, count=layers, layout="nt", weight=True),
        Matmul("gate_up", tokens, hidden, 2 * intermediate, count=layers, layout="nt", weight=True),
        Matmul("down", tokens, intermediate, hidden, count=layers, layout="nt", weight=True),
    ]


def lm_head_products(config: BenchConfig, rows: int, positions: int, chunk_size: int, count: int = 1) -> list[Matmul]:
    """The LM head at `positions` positions of `rows` rows, `chunk_size` positions per product."""
    full, rest = divmod(positions, chunk_size)
    chunks = [(chunk_size, full)] + ([(rest, 1)] if rest else [])
    return [Matmul("lm_head", rows * size, config.hidden_size, config.vocab_size, count=number * count,
                   layout="nt", weight=True) for size, number in chunks if number]


def causal_forward_products(config: BenchConfig, rows: int, positions: int) -> list[Matmul]:
    """Layers and causal attention of a forward over `rows` sequences of `positions` tokens (no LM head)."""
    batch, useful = rows * config.num_heads, (positions + 1) / (2 * positions)
    return layer_products(config, rows * positions, 1) + [
        Matmul("scores", positions, config.head_dim, positions, batch, config.num_layers, "nt", useful),
        Matmul("mix", positions, positions, config.head_dim, batch, config.num_layers, "nn", useful),
    ]


def backward_products(forward: list[Matmul]) -> list[Matmul]:
    """For each product C = A @ B with upstream gradient dC [m, n]: dA = dC @ B^T and dB = A^T @ dC."""
    flip = {"n": "t", "t": "n"}
    products = []
    for product in forward:
        products.append(replace(product, name=product.name + " dA", k=product.n, n=product.k,
                                layout="n" + flip[product.layout[1]], weight=False))
        products.append(replace(product, name=product.name + " dB", m=product.k, k=product.m,
                                layout=flip[product.layout[0]] + "n", weight=False))
    return products


def rollout_products(config: BenchConfig) -> tuple[list[Matmul], list[Matmul]]:
    """(prefill, decode): the prompts' forward with the LM head at their last position, and the
    T - 1 decode steps of all rows (step j's query attends to S + j keys; mean S + T / 2)."""
    prefill = causal_forward_products(config, config.prompts, config.prompt_length)
    prefill += lm_head_products(config, config.prompts, 1, 1)
    steps = config.new_tokens - 1
    if steps == 0:
        return prefill, []
    mean_keys = config.prompt_length + config.new_tokens / 2
    keys = math.ceil(mean_keys)
    batch, layers = config.rows * config.num_heads, config.num_layers * steps
    decode = layer_products(config, config.rows, steps) + [
        Matmul("scores", 1, config.head_dim, keys, batch, layers, "nt", mean_keys / keys),
        Matmul("mix", 1, keys, config.head_dim, batch, layers, "nn", mean_keys / keys),
    ] + lm_head_products(config, config.rows, 1, 1, count=steps)
    return prefill, decode


def logprobs_products(config: BenchConfig, rows: int, chunk_size: int) -> list[Matmul]:
    """Forward of `rows` rows of prompt + completion, LM head at the T predicting positions."""
    positions = config.prompt_length + config.new_tokens
    return causal_forward_products(config, rows, positions) + lm_head_products(config, rows, config.new_tokens,
                                                                                 chunk_size)


def update_products(config: BenchConfig) -> list[Matmul]:
    """Forward and backward of every micro-batch of an on-policy update."""
    products = []
    for start in range(0, config.rows, config.step_micro_batch_size):
        rows = min(config.step_micro_batch_size, config.rows - start)
        forward = logprobs_products(config, rows, config.logits_chunk_size)
        products += forward + backward_products(forward)
    return products


def _onednn_linear_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class ProductTimer:
    """Times matrix products alone, each distinct shape on random operands kept between calls."""

    def __init__(self, clock: Clock, dtype: torch.dtype, min_seconds: float = 0.002):
        self.clock, self.device, self.dtype, self.min_seconds = clock, clock.device, dtype, min_seconds
        self.operands: dict[tuple, list[Callable[[], object]]] = {}
        self.calls: dict[tuple, int] = {}

    def _candidates(self, product: Matmul) -> list[Callable[[], object]]:
        """Ways to compute the product: torch.matmul, and on CPU in fp32 oneDNN with the weight prepacked."""
        batch, m, k, n, layout, weight = product.shape
        options = {"device": self.device, "dtype": self.dtype}
        first = torch.randn(batch, m, k, **options) if layout[0] == "n" else torch.randn(batch, k, m, **options).mT
        second = torch.randn(batch, k, n, **options) if layout[1] == "n" else torch.randn(batch, n, k, **options).mT
        if batch == 1:
            first, second = first[0], second[0]
        candidates = [lambda: torch.matmul(first, second)]
        if (weight and batch == 1 and layout == "nt" and self.device == "cpu" and self.dtype == torch.float32
                and _onednn_linear_available()):
            packed = torch.ops.mkldnn._reorder_linear_weight(second.t().contiguous(), m)
            candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(first, packed, None, "none", [], ""))
        return candidates

    def _seconds_per_call(self, product: Matmul) -> float:
        key = product.shape
        if key not in self.operands:
            self.operands[key] = self._candidates(product)
            self.calls[key] = 1
            for candidate in self.operands[key]:  # warm-up
                candidate()
        best = math.inf
        for candidate in self.operands[key]:
            calls = self.calls[key]
            while True:  # enough calls to last min_seconds, so that the timer's resolution does not matter
                seconds = self.clock.seconds(lambda: [candidate() for _ in range(calls)])
                if seconds >= self.min_seconds or calls >= 1 << 16:
                    break
                calls *= 2
            self.calls[key] = calls
            best = min(best, seconds / calls)
        return best

    @torch.no_grad()
    def seconds(self, products: list[Matmul]) -> float:
        """The summed time of the products (each distinct shape timed once, times its count);
        a product that counts only part of its multiply-adds is charged that part."""
        per_call = {}
        for product in products:
            if product.shape not in per_call:
                per_call[product.shape] = self._seconds_per_call(product)
        return sum(per_call[product.shape] * product.count * product.useful for product in products)


def floor_report(flops: float, floor_seconds: list[float], measured_seconds: list[float]) -> dict:
    """One timed part against its floor: medians, and the per-round fraction of the floor reached."""
    floor = statistics.median(floor_seconds)
    fraction = ratio_summary(floor_seconds, measured_seconds)
    return {"seconds": statistics.median(measured_seconds), "floor_seconds": floor, "flops": flops,
            "floor_flops_per_s": flops / floor, "fraction_of_floor": fraction["median"],
            "fraction_of_floor_range": [fraction["min"], fraction["max"]]}


def rollout_floor_seconds(timer: ProductTimer, config: BenchConfig, prefill: list[Matmul], decode: list[Matmul],
                          bound_step_seconds: float | None = None) -> float:
    """The rollout's floor: its products' time; with `bound_step_seconds` (on CUDA) each decode
    step takes at least that long (the bytes it must read over the copy bandwidth)."""
    decode_seconds = timer.seconds(decode)
    if bound_step_seconds is not None:
        decode_seconds = max(decode_seconds, bound_step_seconds * (config.new_tokens - 1))
    return timer.seconds(prefill) + decode_seconds


def copy_bandwidth(device: str, size_bytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s, from a large device-to-device copy (bytes read + written)."""
    source = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = statistics.median(interleaved({"copy": lambda: Clock(device).seconds(lambda: target.copy_(source))},
                                            repeats=10)["copy"])
    return 2 * size_bytes / seconds


def decode_bytes_per_step(model, config: BenchConfig, element_size: int | None = None) -> float:
    """Fewest bytes one decode step reads, averaged over the steps: every weight matrix
    once (an embedding table that is not also the LM head is left out: a step reads
    only B of its rows), the prompt K/V once per prompt, and each row's generated K/V.
    `element_size`: bytes per value of the decoder (default: the model's)."""
    model_config = model.config
    element = element_size or next(model.parameters()).element_size()
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
# suites
# ---------------------------------------------------------------------------
def bench_rollout(config: BenchConfig, clock: Clock, repeats: int, profile: bool = False, bf16: bool = False) -> dict:
    device = clock.device
    model = build_model(config, device)
    ids, mask = make_prompts(config, device)
    tokens = config.prompts * config.group_size * config.new_tokens
    sampling = {"dtype": "bfloat16"} if bf16 else {}
    precision = torch.bfloat16 if bf16 else next(model.parameters()).dtype
    prefill_products, decode_products = rollout_products(config)
    timer = ProductTimer(clock, precision)
    bound_step_s = None
    if device == "cuda":
        bandwidth = copy_bandwidth(device)
        step_bytes = decode_bytes_per_step(model, config, element_size=precision.itemsize)
        bound_step_s = step_bytes / bandwidth

    def run_generate():
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens,
                num_return_sequences=config.group_size, pad_token_id=0, eos_token_id=1,
            )

    decoders: list = []
    first_compiled_s = None
    if device == "cuda":  # the first fused rollout compiles the step (once per process and model shape)
        first_compiled_s = clock.seconds(lambda: recrl_sample(model, ids, mask, config, compile_decode=True,
                                                              **sampling))
    measures = {
        "recrl": lambda: clock.seconds(lambda: recrl_sample(model, ids, mask, config, decoders=decoders, **sampling)),
        "generate": lambda: clock.seconds(run_generate),
        "prefill": lambda: clock.seconds(lambda: recrl_sample(model, ids, mask, config, max_new_tokens=1, **sampling)),
        "floor": lambda: rollout_floor_seconds(timer, config, prefill_products, decode_products, bound_step_s),
    }
    if device == "cuda":
        measures["recrl_no_graphs"] = lambda: clock.seconds(
            lambda: recrl_sample(model, ids, mask, config, cuda_graphs=False, **sampling))
        measures["recrl_compiled"] = lambda: clock.seconds(
            lambda: recrl_sample(model, ids, mask, config, compile_decode=True, **sampling))
    seconds = interleaved(measures, repeats)
    recrl_s, generate_s, prefill_s = (statistics.median(seconds[name]) for name in ("recrl", "generate", "prefill"))
    decode_s = max(recrl_s - prefill_s, 1e-9)
    speedup = ratio_summary(seconds["generate"], seconds["recrl"])
    flops = total_flops(prefill_products + decode_products)
    result = {
        "recrl_tokens_per_s": tokens / recrl_s,
        "generate_tokens_per_s": tokens / generate_s,
        "speedup": speedup["median"],
        "speedup_range": [speedup["min"], speedup["max"]],
        "recrl_seconds": recrl_s,
        "generate_seconds": generate_s,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": tokens / decode_s,
        "rounds": {name: values for name, values in seconds.items()},
        "floor": {"recrl": floor_report(flops, seconds["floor"], seconds["recrl"]),
                  "generate": floor_report(flops, seconds["floor"], seconds["generate"]),
                  "precision": str(precision).removeprefix("torch.")},
    }
    if device == "cuda":
        eager_s = statistics.median(seconds["recrl_no_graphs"])
        compiled_s = statistics.median(seconds["recrl_compiled"])
        rows = config.prompts * config.group_size
        measured_step_s = decode_s / max(config.new_tokens - 1, 1)  # the first token comes from the prefill
        result.update({
            "recrl_no_graphs_tokens_per_s": tokens / eager_s,
            "cuda_graphs_speedup": eager_s / recrl_s,
            "recrl_compiled_tokens_per_s": tokens / compiled_s,  # sampling.compile_decode=true
            "compile_speedup": recrl_s / compiled_s,
            "first_compiled_rollout_seconds": first_compiled_s,  # compilation included
            "graph_captures_per_rollout": decoders[-1].captures,
            "graph_capture_seconds_per_rollout": decoders[-1].capture_seconds,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "decode_bytes_per_step": step_bytes,
            "decode_step_seconds": measured_step_s,
            "decode_bound_step_seconds": bound_step_s,
            "decode_bound_tokens_per_s": rows / bound_step_s,
            "decode_fraction_of_bound": bound_step_s / measured_step_s,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        })
    if profile:
        result["profile"] = profile_rollout(model, ids, mask, config, device, cuda_graphs=False)
        if device == "cuda":  # the step as it runs: captured, and captured with its element-wise chains fused
            result["profile_graphed"] = profile_rollout(model, ids, mask, config, device, **sampling)
            result["profile_compiled"] = profile_rollout(model, ids, mask, config, device, compile_decode=True,
                                                         **sampling)
    return result


def profile_rollout(model, ids, mask, config: BenchConfig, device: str, steps: int = 16, **sampling) -> dict:
    """Where a decode step's time goes: torch.profiler over a short rollout (`sampling`: its
    SamplingConfig settings; cuda_graphs=False shows the eager step, see the module
    docstring), prefill subtracted by profiling a 1-token rollout too."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU

    def kernels(new_tokens: int) -> dict[str, tuple[int, float]]:
        recrl_sample(model, ids, mask, config, max_new_tokens=new_tokens, **sampling)  # warm-up
        with profile(activities=[activity]) as profiler:
            recrl_sample(model, ids, mask, config, max_new_tokens=new_tokens, **sampling)
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


def _logprobs_worker(args) -> tuple[list[float], int, list[float]]:
    """Run one log-prob variant in a fresh process; return (seconds per round, peak extra
    bytes, floor seconds per round). The peak is that of the first (warm-up) call."""
    config, clock, variant, repeats, retain_memory = args
    device = clock.device
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if retain_memory:  # as the parent process (a spawned one starts with glibc's defaults)
        retain_freed_memory()
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
        return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                   chunk_size=LOGPROBS_CHUNK_SIZE).logprobs

    function = naive if variant == "naive" else recrl
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        function()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        baseline = reset_peak_rss()
        function()
        peak = peak_rss() - baseline
    timer = ProductTimer(clock, next(model.parameters()).dtype)
    products = logprobs_products(config, rows, LOGPROBS_CHUNK_SIZE)
    seconds = interleaved({"run": lambda: clock.seconds(function), "floor": lambda: timer.seconds(products)},
                          repeats)
    return seconds["run"], int(peak), seconds["floor"]


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


def bench_logprobs(config: BenchConfig, clock: Clock, repeats: int, retain_memory: bool = False) -> dict:
    device = clock.device
    context = multiprocessing.get_context("spawn")
    results = {}
    for variant in ("naive", "recrl"):
        with context.Pool(1) as pool:
            results[variant] = pool.apply(_logprobs_worker, ((config, clock, variant, repeats, retain_memory),))
    (naive_s, naive_peak, naive_floor), (recrl_s, recrl_peak, recrl_floor) = results["naive"], results["recrl"]
    flops = total_flops(logprobs_products(config, config.rows, LOGPROBS_CHUNK_SIZE))
    return {
        "recrl_seconds": statistics.median(recrl_s), "naive_seconds": statistics.median(naive_s),
        "recrl_peak_bytes": recrl_peak, "naive_peak_bytes": naive_peak,
        "peak_ratio": recrl_peak / max(naive_peak, 1),
        "memory_measure": "CUDA max_memory_allocated" if device == "cuda" else "peak RSS growth (fresh process, peak reset first)",
        "floor": {"recrl": floor_report(flops, recrl_floor, recrl_s), "naive": floor_report(flops, naive_floor, naive_s)},
    }


def bench_step(config: BenchConfig, clock: Clock, repeats: int, profile: bool = False, bf16: bool = False) -> dict:
    from algorithms.grpo import GRPO
    from engine.learner import Learner, LearnerConfig, PolicyBatch, Rewards

    device = clock.device
    model = build_model(config, device).float()  # fp32 master weights; bf16 autocast on CUDA comes from the learner
    low_precision = device == "cuda" or bf16
    sampling = {"dtype": "bfloat16"} if low_precision else {}  # a bf16 decoder snapshot
    # the learner autocasts on CUDA itself; on CPU (--bf16) the update runs under CPU autocast here
    strategy = GRPO()
    learner = Learner(model, LearnerConfig(lr=1e-5, kl_coef=0.0, ppo_epochs=1,
                                           micro_batch_size=config.step_micro_batch_size,
                                           logits_chunk_size=config.logits_chunk_size,
                                           loss_agg_mode="token_mean"), strategy)
    ids, mask = make_prompts(config, device)
    generator = torch.Generator().manual_seed(0)
    timer = ProductTimer(clock, torch.bfloat16 if low_precision else torch.float32)
    prefill_products, decode_products = rollout_products(config)
    learn_products = update_products(config)
    bound_step_s = decode_bytes_per_step(model, config, element_size=2) / copy_bandwidth(device) \
        if device == "cuda" else None
    phases: dict[str, list[float]] = {"rollout": [], "reward": [], "advantages": [], "update": []}
    totals, rollout_floor, update_floor, update_faults = [], [], [], []
    for step in range(repeats + 1):
        start = clock.now()
        rollout = recrl_sample(model, ids, mask, config, **sampling)
        after_rollout = clock.now()
        rewards = Rewards.from_tensor(torch.rand(rollout.num_rows, generator=generator).to(device))
        after_reward = clock.now()
        unit_ids = strategy.unit_ids(rollout, rewards)
        advantages = strategy.advantages(rewards, rollout, unit_ids)
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        after_advantages = clock.now()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and device == "cpu" else nullcontext():
            learner.update(PolicyBatch(rollout, rewards, unit_ids, advantages))
        end = clock.now()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
        if step == 0:
            continue  # warm-up
        update_faults.append(faults)
        rollout_floor.append(rollout_floor_seconds(timer, config, prefill_products, decode_products, bound_step_s))
        update_floor.append(timer.seconds(learn_products))
        phases["rollout"].append(after_rollout - start)
        phases["reward"].append(after_reward - after_rollout)
        phases["advantages"].append(after_advantages - after_reward)
        phases["update"].append(end - after_advantages)
        totals.append(end - start)
    rollout_flops, update_flops = total_flops(prefill_products + decode_products), total_flops(learn_products)
    result = {"step_s": statistics.median(totals), "phases": {k: statistics.median(v) for k, v in phases.items()},
              "micro_batch_size": config.step_micro_batch_size, "rounds": {"step": totals, **phases},
              "update_page_faults": statistics.median(update_faults),
              "floor": {"update": floor_report(update_flops, update_floor, phases["update"]),
                        "rollout": floor_report(rollout_flops, rollout_floor, phases["rollout"]),
                        "step": floor_report(rollout_flops + update_flops,
                                             [a + b for a, b in zip(rollout_floor, update_floor)], totals),
                        "precision": "bfloat16" if low_precision else "float32"}}
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    if profile:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and device == "cpu" else nullcontext():
            result["profile"] = profile_update(learner, PolicyBatch(rollout, rewards, unit_ids, advantages), device)
    return result


PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention",
               "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_efficient_attention_forward",
               "aten::_flash_attention_forward", "aten::_flash_attention_backward", "aten::_efficient_attention_backward",
               "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_update(learner, batch, device: str, top: int = 15) -> dict:
    """Where an update's time goes: torch.profiler over one update, each op's own time (CUDA
    kernel time on a GPU, else CPU time), the top ops, and the share of the matrix products
    (GEMMs and attention kernels) against everything else."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        learner.update(batch)
        synchronize(device)
    own = {}
    for average in profiler.key_averages():
        seconds = (average.self_device_time_total if device == "cuda" else average.self_cpu_time_total) * 1e-6
        if seconds > 0:
            own[average.key] = (average.count, seconds)
    total = sum(seconds for _, seconds in own.values())
    products = sum(seconds for name, (_, seconds) in own.items() if name in PRODUCT_OPS)
    ranked = sorted(own.items(), key=lambda item: -item[1][1])[:top]
    return {"op_seconds": total, "product_share": products / total if total else 0.0,
            "top_ops": [{"name": name[:120], "calls": calls, "seconds": seconds, "share": seconds / total}
                        for name, (calls, seconds) in ranked]}


# ---------------------------------------------------------------------------
# a finished run's wall time, phase by phase
# ---------------------------------------------------------------------------
def run_breakdown(run_dir: str | Path) -> dict:
    """Split a run's wall time into SFT, rollout, reward, update and evaluation.

    From `metrics.jsonl`: each step's time_rollout_s, time_reward_s (rewards, reward
    shaping, dynamic sampling's bookkeeping) and time_learn_s (credit assignment and the
    learner's update), and each evaluation row's time_eval_s. The test evaluation of the
    best checkpoint at the end is not a row: when the best step is not the last, it is
    counted at the time of the last step's test evaluation (same split, same work). SFT:
    `sft_time.json` of the warm-start checkpoint named in `config.json` (the time it took
    when it was trained; a later run that reuses the cached checkpoint spends nothing on it).
    Checkpoint saves and start-up are in no phase."""
    from engine.logging import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: pass the directory of an RL run")
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [row for row in rows if not row.get("eval")]
    evaluations = [row for row in rows if row.get("eval")]
    seconds: dict[str, float | None] = {
        phase: sum(row.get(key) or 0.0 for row in steps)
        for phase, key in (("rollout", "time_rollout_s"), ("reward", "time_reward_s"), ("update", "time_learn_s"))
    }
    notes = []
    if all("time_eval_s" in row for row in evaluations):
        seconds["evaluation"] = sum(row["time_eval_s"] for row in evaluations)
        selection_path, test_rows = run_dir / "selection.json", [row for row in evaluations if row.get("split") == "test"]
        if selection_path.exists() and test_rows and steps:
            if json.loads(selection_path.read_text()).get("best_step") != steps[-1]["step"]:
                seconds["evaluation"] += test_rows[-1]["time_eval_s"]
                notes.append("the best checkpoint's test evaluation is counted at the last test evaluation's time")
    else:
        seconds["evaluation"] = None
        notes.append("evaluation rows carry no time_eval_s (a run from before they were timed)")
    seconds["sft"] = None
    config_path = run_dir / "config.json"
    record = json.loads(config_path.read_text()) if config_path.exists() else {}
    checkpoint = record.get("sft_checkpoint") or record.get("initial_model")
    if checkpoint and (Path(checkpoint) / "sft_time.json").exists():
        seconds["sft"] = json.loads((Path(checkpoint) / "sft_time.json").read_text())["seconds"]
    elif checkpoint and Path(checkpoint).is_dir():
        notes.append(f"the warm-start checkpoint {checkpoint} records no sft_time.json")
    seconds = {phase: seconds[phase] for phase in ("sft", "rollout", "reward", "update", "evaluation")}
    total = sum(value for value in seconds.values() if value is not None)
    return {"run_dir": str(run_dir), "steps": len(steps), "evaluations": len(evaluations), "seconds": seconds,
            "total_seconds": total, "notes": notes,
            "share": {phase: value / total for phase, value in seconds.items() if value is not None and total}}


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(result: dict) -> None:
    """The headline figures, and each timed part next to its floor, on stderr."""
    for key, value in result.items():
        if key.endswith("page_faults"):
            print(f"  {key:<24} {value:,.0f}", file=sys.stderr)
        elif isinstance(value, float):
            print(f"  {key:<24} {value:,.4f}", file=sys.stderr)
    for part, report in result.get("floor", {}).items():
        if isinstance(report, dict):
            low, high = report["fraction_of_floor_range"]
            print(f"  {part:<10} {report['seconds']:8.4f} s   floor {report['floor_seconds']:8.4f} s   "
                  f"{report['fraction_of_floor']:6.1%} of the floor ({low:.1%}-{high:.1%})", file=sys.stderr)
    profile = result.get("profile", {})
    if "top_ops" in profile:
        print(f"  update profile: matrix products {profile['product_share']:.1%} of the op time", file=sys.stderr)
        for op in profile["top_ops"]:
            print(f"    {op['name'][:56]:<56} {op['calls']:5d} calls {op['seconds']:8.4f} s {op['share']:6.1%}",
                  file=sys.stderr)
    for phase, value in result.get("seconds", {}).items():
        share = result["share"].get(phase)
        print(f"  {phase:<10} " + ("unknown" if value is None else f"{value:10.1f} s  {share:6.1%}"), file=sys.stderr)


SUITES = {"rollout": bench_rollout, "logprobs": bench_logprobs, "step": bench_step}


def json_path_problem(path: str) -> str | None:
    """Why the result could not be written to `path` (None: it can); its folder is created if missing."""
    target = Path(path)
    if target.is_dir():
        return "is a folder; name a file"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"its folder cannot be created ({error.strerror})"
    existed = target.exists()
    try:  # the only sure test (permissions alone do not tell, e.g. for root or under /proc)
        with open(target, "a"):
            pass
    except OSError as error:
        return f"cannot be written ({error.strerror})"
    if not existed:
        target.unlink()
    return None


def refuse_json_path(path: str | None) -> bool:
    """True, after one error line, when `--json path` was given and cannot be written."""
    problem = path and json_path_problem(path)
    if problem:
        print(f"error: --json {path}: {problem}", file=sys.stderr)
    return bool(problem)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["breakdown"]:
        parser = argparse.ArgumentParser(prog="python -m experiments.bench breakdown",
                                         description="split a run's wall time into its phases")
        parser.add_argument("run_dir")
        parser.add_argument("--json", help="also write the JSON object to this file")
        args = parser.parse_args(argv[1:])
        if refuse_json_path(args.json):
            return 2
        try:
            result = run_breakdown(args.run_dir)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
        parser.add_argument("suite", choices=sorted(SUITES))
        parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
        parser.add_argument("--config", choices=sorted(CONFIGS), default="C0")
        parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
        parser.add_argument("--json", help="also write the JSON object to this file")
        parser.add_argument("--profile", action="store_true",
                            help="rollout: also profile a decode step (kernels and their time, graphs off); "
                                 "step: also profile one update (ops and their own time)")
        parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                            help="wall time, or the process's CPU time (one thread only: OMP_NUM_THREADS=1; on a "
                                 "shared machine it barely feels the other processes' load)")
        parser.add_argument("--default-allocator", action="store_true",
                            help="keep glibc's default malloc thresholds instead of retaining freed host memory "
                                 "as experiments.run does (engine/host_memory.py): to measure what that saves")
        parser.add_argument("--bf16", action="store_true",
                            help="rollout, step on CPU: sample with a bf16 decoder snapshot (step: and update "
                                 "under bf16 autocast), as on CUDA")
        args = parser.parse_args(argv)
        if args.profile and args.suite == "logprobs":
            parser.error("--profile is an option of the rollout and step suites")
        if args.bf16 and (args.suite == "logprobs" or args.device != "cpu"):
            parser.error("--bf16 is a CPU option of the rollout and step suites (CUDA runs them in bf16 already)")
        if args.repeats < 1:
            parser.error("--repeats must be >= 1")
        if args.clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
            parser.error("--clock cpu measures one CPU thread's work: run on the CPU with OMP_NUM_THREADS=1")
        if args.device == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda: no CUDA device is available here", file=sys.stderr)
            return 2
        if refuse_json_path(args.json):  # before the minutes of measuring, not after
            return 2
        config = CONFIGS[args.config]
        retained = False if args.default_allocator else retain_freed_memory()
        import transformers

        options = {"profile": True} if args.profile else {}
        if args.bf16:
            options["bf16"] = True
        if args.suite == "logprobs":
            options["retain_memory"] = retained  # its variants run in fresh processes
        result = {
            "suite": args.suite,
            "config": asdict(config),
            "device": torch.cuda.get_device_name(0) if args.device == "cuda"
            else f"cpu ({torch.get_num_threads()} threads, {cpu_name()})",
            # whether this CPU computes bf16 products in hardware (AVX-512 BF16 / AMX); without, --bf16 is emulated
            "cpu_vector_isa": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_products": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "repeats": args.repeats,
            "clock": args.clock,
            "freed_host_memory_retained": retained,
            **SUITES[args.suite](config, Clock(args.device, args.clock), args.repeats, **options),
        }
    text = json.dumps(result, indent=2)
    print(text)
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
