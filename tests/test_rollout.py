"""Sampler behaviour: recompute consistency, greedy == generate, EOS and masks, filtering,
with the plain transformers decoder and with the fastdecode accelerator."""

import pytest
import torch

from engine.rollout import Rollout, SamplingConfig, filter_logits, sample, transformers_decoder
from fastdecode import KVDecoder, fast_decoder
from tests.conftest import left_padded_prompts, make_model, recompute_gaps

PROMPTS = ["Sort these digits: 3 1 2", "Recommend movies like Heat (1995)", "Fargo"]


def static_decoder(model, max_batch_size, max_total_length, config):
    """The graph-shaped decode step (what CUDA graphs capture), run eagerly on the CPU."""
    return KVDecoder(model, max_batch_size, max_total_length, static_decode=True, graph_bucket=5)


DECODERS = {"fast": fast_decoder, "plain": transformers_decoder, "static": static_decoder}


def _sample(model, tokenizer, temperature, group_size=4, max_new_tokens=12, eos=None, pad=None, seed=0,
            decoder="fast", prompts=PROMPTS, **kw):
    """temperature 0 = greedy."""
    ids, mask = left_padded_prompts(tokenizer, prompts)
    generator = torch.Generator().manual_seed(seed)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature or 1.0, **kw)
    return sample(
        model, ids, mask, group_size, config, eos_token_ids=[tokenizer.eos_token_id] if eos is None else eos,
        pad_token_id=tokenizer.pad_token_id if pad is None else pad, generator=generator,
        greedy=temperature == 0, make_decoder=DECODERS[decoder],
    )


def _max_recompute_gap(model, rollout):
    return recompute_gaps(model, rollout, chunk_size=5)[0]  # chunks of 5: the chunked recompute is exercised


def _frequent_token(model, tokenizer):
    """The token the policy samples most often: used as EOS so that rows stop at different steps."""
    rollout = _sample(model, tokenizer, 1.0, max_new_tokens=16, eos=[-1])
    return int(rollout.completion_ids.flatten().mode().values)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampler_logprobs_equal_recompute(tokenizer, architecture, temperature):
    model = make_model(tokenizer, architecture, tie=architecture == "qwen2")
    rollout = _sample(model, tokenizer, temperature)
    assert rollout.prompt_mask.sum(1).unique().numel() > 1  # mixed prompt lengths, left padding
    assert _max_recompute_gap(model, rollout) < 1e-5


def test_pad_equal_to_eos_uses_masks(qwen_model, tokenizer):
    eos = _frequent_token(qwen_model, tokenizer)
    rollout = _sample(qwen_model, tokenizer, 1.0, eos=[eos], pad=eos, max_new_tokens=16)
    assert rollout.ended_with_eos.any()
    for row in range(rollout.num_rows):
        mask = rollout.completion_mask[row]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # mask is a prefix
        if rollout.ended_with_eos[row]:
            assert int(rollout.completion_ids[row, length - 1]) == eos  # EOS kept, counted
            assert (rollout.completion_ids[row, :length - 1] != eos).all()
    assert _max_recompute_gap(qwen_model, rollout) < 1e-5


def test_rows_stop_at_their_first_eos_and_batch_stops_early(untied_qwen_model, tokenizer):
    qwen_model = untied_qwen_model
    free = _sample(qwen_model, tokenizer, 0.0, group_size=1, max_new_tokens=10, eos=[-1])
    eos_ids = sorted({int(free.completion_ids[row, 3]) for row in range(free.num_rows)})
    stopped = _sample(qwen_model, tokenizer, 0.0, group_size=1, max_new_tokens=10, eos=eos_ids)
    expected_lengths = []
    for row in range(free.num_rows):
        tokens = free.completion_ids[row].tolist()
        expected_lengths.append(next(i for i, t in enumerate(tokens) if t in eos_ids) + 1)
    assert stopped.completion_lengths.tolist() == expected_lengths
    assert stopped.ended_with_eos.all()
    assert stopped.completion_ids.shape[1] == max(expected_lengths) <= 4  # no step after the last EOS
    assert (free.completion_lengths == 10).all() and not free.ended_with_eos.any()


def test_greedy_equals_transformers_generate(tokenizer):
    for architecture in ("qwen2", "llama"):
        model = make_model(tokenizer, architecture, tie=False)  # tied random heads just repeat the input
        ids, mask = left_padded_prompts(tokenizer, PROMPTS)
        rollout = _sample(model, tokenizer, 0.0, group_size=1, max_new_tokens=10)
        generated = model.generate(
            input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=10,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )[:, ids.shape[1]:]
        for row in range(len(PROMPTS)):
            length = int(rollout.completion_lengths[row])
            assert rollout.completion_ids[row, :length].tolist() == generated[row, :length].tolist()


def test_group_rows_contiguous_and_seeded(qwen_model, tokenizer):
    first = _sample(qwen_model, tokenizer, 1.0, seed=3)
    second = _sample(qwen_model, tokenizer, 1.0, seed=3)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert first.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert torch.equal(first.prompt_ids[0], first.prompt_ids[3])
    # different samples inside a group (temperature 1 over a random model)
    assert not torch.equal(first.completion_ids[0], first.completion_ids[1])


def test_plain_decoder_matches_fast_decoder(qwen_model, tokenizer):
    fast = _sample(qwen_model, tokenizer, 0.0, group_size=2, max_new_tokens=8)
    slow = _sample(qwen_model, tokenizer, 0.0, group_size=2, max_new_tokens=8, decoder="plain")
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.old_logprobs, slow.old_logprobs, atol=1e-5, rtol=0)
    assert _max_recompute_gap(qwen_model, _sample(qwen_model, tokenizer, 1.0, decoder="plain")) < 1e-5


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_top_k_sampling_only_draws_top_tokens(qwen_model, tokenizer):
    rollout = _sample(qwen_model, tokenizer, 1.0, top_k=1, max_new_tokens=6)
    greedy = _sample(qwen_model, tokenizer, 0.0, max_new_tokens=6)
    assert torch.equal(rollout.completion_ids, greedy.completion_ids)


def test_bad_inputs_are_reported(qwen_model, tokenizer):
    ids, mask = left_padded_prompts(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="left-padded"):
        sample(qwen_model, ids, mask.flip(1), 2, SamplingConfig(), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"\[P, S\]"):
        sample(qwen_model, ids[0], mask[0], 2, SamplingConfig(), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    for temperature in (-1.0, 0.0):
        with pytest.raises(ValueError, match="temperature"):
            SamplingConfig(temperature=temperature)


def test_rollout_concatenate_and_select(qwen_model, tokenizer):
    first = _sample(qwen_model, tokenizer, 1.0, group_size=2, max_new_tokens=5)
    second = _sample(qwen_model, tokenizer, 1.0, group_size=2, max_new_tokens=9, seed=1)
    both = Rollout.concatenate([first, second.select_rows(torch.tensor([2, 3]))])
    assert both.num_rows == 8 and both.completion_ids.shape[1] == second.completion_ids.shape[1]
    assert both.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not both.completion_mask[:6, 5:].any()
    assert torch.equal(both.completion_ids[6:], second.completion_ids[2:4])


@pytest.mark.parametrize("decoder", ["fast", "static", "plain"])
def test_dropping_finished_rows_changes_no_row(untied_qwen_model, tokenizer, decoder):
    # Rows end at different steps, so the sampler compacts the decoder batch mid-way.
    # Greedy rows must equal the same prompt decoded alone; sampled rows must keep
    # old_logprobs equal to the recompute.
    qwen_model = untied_qwen_model
    free = _sample(qwen_model, tokenizer, 0.0, group_size=1, max_new_tokens=12, eos=[-1], decoder=decoder)
    def lengths_if_eos(token):  # where each row would stop if `token` were EOS
        rows = free.completion_ids.tolist()
        return [row.index(token) + 1 if token in row else 12 for row in rows]

    candidates = sorted(set(free.completion_ids.flatten().tolist()))
    eos = [next(t for t in candidates if len(set(lengths_if_eos(t))) > 1)]  # rows stop at different steps
    together = _sample(qwen_model, tokenizer, 0.0, group_size=1, max_new_tokens=12, eos=eos, decoder=decoder)
    assert together.completion_lengths.unique().numel() > 1
    for row, text in enumerate(PROMPTS):
        alone = _sample(qwen_model, tokenizer, 0.0, group_size=1, max_new_tokens=12, eos=eos, decoder=decoder,
                        prompts=[text])
        length = int(alone.completion_lengths[0])
        assert int(together.completion_lengths[row]) == length
        assert together.completion_ids[row, :length].tolist() == alone.completion_ids[0, :length].tolist()
    sampled = _sample(qwen_model, tokenizer, 1.0, group_size=4, max_new_tokens=16,
                      eos=[_frequent_token(qwen_model, tokenizer)], decoder=decoder)
    assert sampled.completion_lengths.unique().numel() > 1
    assert _max_recompute_gap(qwen_model, sampled) < 1e-5


def test_bf16_sampling_over_fp32_weights(qwen_model, tokenizer):
    """SamplingConfig.dtype casts the decoder only: the model stays fp32, and the
    sampled log-probs stay within bf16 rounding of the fp32 recompute."""
    rollout = _sample(qwen_model, tokenizer, 1.0, dtype="bfloat16")
    assert next(qwen_model.parameters()).dtype == torch.float32
    assert fast_decoder(qwen_model, 4, 16, SamplingConfig(dtype="auto")).dtype == torch.float32  # bf16 on CUDA only
    assert rollout.old_logprobs.dtype == torch.float32
    assert rollout.completion_mask.any()
    assert _max_recompute_gap(qwen_model, rollout) < 0.03  # bf16 weights and cache vs fp32 (measured 0.005)

    with pytest.raises(ValueError, match="dtype='fp8': choose one of auto"):
        SamplingConfig(dtype="fp8")
    with pytest.raises(ValueError, match="set sampling.dtype to 'auto' or 'model'"):
        _sample(qwen_model, tokenizer, 1.0, dtype="bfloat16", decoder="plain")
    # the transformers forward samples in the model's precision: "auto" and the model's own dtype are fine
    assert _sample(qwen_model, tokenizer, 1.0, dtype="float32", decoder="plain").completion_mask.any()
    assert _sample(qwen_model, tokenizer, 1.0, dtype="auto", decoder="plain").completion_mask.any()
