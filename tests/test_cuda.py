"""CUDA paths: the captured decode step, bf16 sampling, the autocast learner, reference offload.

Skipped where no GPU is present (CI has none); on a GPU machine run `pytest -q tests/test_cuda.py`.

Tolerances. fp32 on CUDA (TF32 off, PyTorch's default): the decoder agrees with the
transformers forward within 1e-4 in logits and the sampler's log-probs agree with the
recompute within 1e-4 (GPU kernels sum in other orders than the CPU's, hence 1e-4 rather
than the CPU tests' 1e-5). bf16: sampler and recompute run different kernels in bf16, so
their log-probs differ by rounding: at most 0.1 nats, 0.02 on average (a wrong position,
mask or cache entry shows as whole nats).
"""

import pytest
import torch

from algorithms.grpo import GRPO
from fastdecode import KVDecoder, fast_decoder
from engine.rollout import sample_categorical
from engine.learner import Learner, LearnerConfig, PolicyBatch, Rewards
from engine.rollout import SamplingConfig, sample
from tests.conftest import hf_logits, left_padded_prompts, make_model, recompute_gaps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
PROMPTS = ["Sort these digits: 3 1 2", "Recommend movies like Heat (1995)", "Fargo"]
BF16_MAX_GAP, BF16_MEAN_GAP = 0.1, 0.02


def _prompts(tokenizer):
    ids, mask = left_padded_prompts(tokenizer, PROMPTS)
    return ids.to(CUDA), mask.to(CUDA)


def _model(tokenizer, architecture="qwen2", tie=False, dtype=torch.float32):
    return make_model(tokenizer, architecture, tie=tie).to(device=CUDA, dtype=dtype)


def _sample(model, tokenizer, temperature, group_size=4, max_new_tokens=24, eos=None, seed=0, **sampling):
    """Sample with the fast decoder in the model's own precision unless `dtype` is given ("auto",
    the default of SamplingConfig, would sample an fp32 model in bf16 on CUDA)."""
    sampling.setdefault("dtype", "model")
    ids, mask = _prompts(tokenizer)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature or 1.0, **sampling)
    return sample(model, ids, mask, group_size, config, [tokenizer.eos_token_id] if eos is None else eos,
                  tokenizer.pad_token_id, torch.Generator(device=CUDA).manual_seed(seed), greedy=temperature == 0,
                  make_decoder=fast_decoder)


def _eos_ending_some_rows(model, tokenizer, temperature=1.0, seed=0) -> int:
    """A token that the rollout with this seed samples in some rows (before their last step) and
    not in others: used as EOS, the same rollout ends those rows early, so rows get dropped."""
    free = _sample(model, tokenizer, temperature, eos=[-1], seed=seed)
    rows_with_token: dict[int, int] = {}
    for row in free.completion_ids[:, :-1].tolist():
        for token in set(row):
            rows_with_token[token] = rows_with_token.get(token, 0) + 1
    partial = [token for token, rows in rows_with_token.items() if rows < free.num_rows]
    return max(partial, key=lambda token: rows_with_token[token])


def test_sample_categorical_distribution_on_cuda():
    """On CUDA the sampler draws by exponential race: frequencies match, zeros never drawn."""
    generator = torch.Generator(device=CUDA).manual_seed(0)
    probs = torch.softmax(torch.randn(3, 1000, device=CUDA, generator=generator), -1)
    probs[:, ::7] = 0.0
    n = 20000
    draws = sample_categorical(probs.repeat(n, 1), generator=generator).view(n, 3)
    target = probs / probs.sum(-1, keepdim=True)
    for row in range(3):
        frequencies = torch.bincount(draws[:, row], minlength=1000).float() / n
        assert frequencies[::7].sum() == 0
        assert (frequencies - target[row]).abs().max() < 0.006  # max p ~ 0.01: ~ 8 standard errors


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_captured_decode_matches_eager_and_transformers(tokenizer, architecture):
    model = _model(tokenizer, architecture)
    ids, mask = _prompts(tokenizer)
    P, S = ids.shape
    R, steps = 2, 11
    # buckets 4, 8, 12: two boundaries; the element-wise chains fused by inductor
    graphed = KVDecoder(model, P * R, S + steps + 1, graph_bucket=4, compile_step=True)
    eager = KVDecoder(model, P * R, S + steps + 1, cuda_graphs=False)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    assert graphed.compile_backend == "inductor" and eager.compile_backend is None
    torch.testing.assert_close(graphed.prefill(ids, mask, R), eager.prefill(ids, mask, R), atol=1e-5, rtol=0)
    full_ids, full_mask = ids.repeat_interleave(R, 0), mask.repeat_interleave(R, 0).long()
    generator = torch.Generator(device=CUDA).manual_seed(0)
    for step in range(steps):
        if step == 6:  # drop two rows and reorder the rest: the graphs are recaptured for 4 rows
            keep = torch.tensor([4, 0, 3, 1], device=CUDA)
            graphed.keep_rows(keep)
            eager.keep_rows(keep)
            full_ids, full_mask = full_ids[keep], full_mask[keep]
        tokens = torch.randint(3, model.config.vocab_size, (full_ids.shape[0],), device=CUDA, generator=generator)
        full_ids = torch.cat([full_ids, tokens[:, None]], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
        out_graphed = graphed.decode(tokens).clone()  # the graph's output buffer is reused by the next step
        out_eager = eager.decode(tokens)
        torch.testing.assert_close(out_graphed, out_eager, atol=1e-4, rtol=0)
        torch.testing.assert_close(out_graphed, hf_logits(model, full_ids, full_mask)[:, -1], atol=1e-4, rtol=0)
    assert sorted(graphed.graphs) == [(4, 8), (4, 12)]  # captured after the last keep_rows
    # (6, 4), (6, 8), then, into a fresh pool after keep_rows dropped both (the case that used
    # to fail the allocator's assertion), (4, 8), (4, 12)
    assert graphed.captures == 4


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampler_logprobs_equal_recompute_fp32(tokenizer, architecture, temperature):
    model = _model(tokenizer, architecture, tie=architecture == "qwen2")
    rollout = _sample(model, tokenizer, temperature, eos=[_eos_ending_some_rows(model, tokenizer, temperature)])
    assert rollout.completion_lengths.unique().numel() > 1  # rows ended at different steps
    max_gap, _ = recompute_gaps(model, rollout)
    assert max_gap < 1e-4


def test_greedy_equals_transformers_generate(tokenizer):
    for architecture in ("qwen2", "llama"):
        model = _model(tokenizer, architecture)
        ids, mask = _prompts(tokenizer)
        rollout = _sample(model, tokenizer, 0.0, group_size=1, max_new_tokens=12)
        generated = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=12,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   )[:, ids.shape[1]:]
        for row in range(len(PROMPTS)):
            length = int(rollout.completion_lengths[row])
            assert rollout.completion_ids[row, :length].tolist() == generated[row, :length].tolist()


@pytest.mark.parametrize("variant", [dict(cuda_graphs=False), dict(compile_decode=True)],
                         ids=["graphs_off", "compile_on"])
def test_graphs_off_and_compile_on_sample_the_same_tokens(tokenizer, variant):
    """The default (captured, uncompiled step) against the eager step and against the fused one."""
    model = _model(tokenizer)
    default = _sample(model, tokenizer, 1.0, seed=5)
    other = _sample(model, tokenizer, 1.0, seed=5, **variant)
    # Same exponential draws, logits equal to ~1e-6: the race's winner changes only when
    # two candidates' p / E are within ~1e-6, which would change (at most) one row from there on.
    same_rows = (default.completion_ids == other.completion_ids).all(dim=1)  # [B]
    assert int((~same_rows).sum()) <= 1
    torch.testing.assert_close(default.old_logprobs[same_rows], other.old_logprobs[same_rows], atol=1e-4, rtol=0)


def test_bf16_model_sampler_matches_recompute(tokenizer):
    model = _model(tokenizer, dtype=torch.bfloat16)
    rollout = _sample(model, tokenizer, 1.0, eos=[_eos_ending_some_rows(model, tokenizer)])
    max_gap, mean_gap = recompute_gaps(model, rollout)
    assert max_gap < BF16_MAX_GAP and mean_gap < BF16_MEAN_GAP, (max_gap, mean_gap)


def test_bf16_decoder_over_fp32_weights_matches_autocast_recompute(tokenizer):
    """What a trainer on a GPU does ("auto": a bf16 snapshot of fp32 weights), then recompute
    under bf16 autocast."""
    model = _model(tokenizer)
    assert fast_decoder(model, 4, 16, SamplingConfig(dtype="auto")).dtype == torch.bfloat16
    assert fast_decoder(model, 4, 16, SamplingConfig(dtype="model")).dtype == torch.float32
    rollout = _sample(model, tokenizer, 1.0, dtype="auto")
    assert next(model.parameters()).dtype == torch.float32
    max_gap, mean_gap = recompute_gaps(model, rollout, autocast=True)
    assert max_gap < BF16_MAX_GAP and mean_gap < BF16_MEAN_GAP, (max_gap, mean_gap)


def test_autocast_learner_with_offloaded_reference(tokenizer):
    strategy = GRPO()
    policy_for_sampling = _model(tokenizer)
    rollout = _sample(policy_for_sampling, tokenizer, 1.0, eos=[_eos_ending_some_rows(policy_for_sampling, tokenizer)])
    rewards = Rewards.from_tensor(torch.linspace(0.0, 1.0, rollout.num_rows, device=CUDA) ** 2)
    unit_ids = strategy.unit_ids(rollout, rewards)
    batch = PolicyBatch(rollout, rewards, unit_ids, strategy.advantages(rewards, rollout, unit_ids))
    results = []
    for offload in (False, True):
        model = _model(tokenizer)
        reference = make_model(tokenizer, seed=1, tie=False).to(CUDA)
        learner = Learner(model, LearnerConfig(kl_coef=0.1, lr=1e-3, reference_offload=offload), strategy,
                          reference_model=reference)
        before = [p.detach().clone() for p in model.parameters()]
        metrics = learner.update(batch)
        assert metrics["skipped_optimizer_steps"] == 0 and metrics["kl"] > 1e-4
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        reference_device = next(reference.parameters()).device.type
        assert reference_device == ("cpu" if offload else "cuda")
        results.append(metrics)
    assert results[0]["kl"] == pytest.approx(results[1]["kl"], rel=1e-5)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5, abs=1e-7)
