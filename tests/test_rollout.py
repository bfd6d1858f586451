"""Sampler behaviour: recompute consistency, greedy == generate, EOS and masks, filtering."""

import pytest
import torch

from engine.decoder import KVDecoder
from engine.rollout import Rollout, SamplingConfig, filter_logits, make_decoder, sample
from tests.conftest import left_padded_prompts, make_model, recompute_gaps

PROMPTS = ["Sort these digits: 3 1 2", "Recommend movies like Heat (1995)", "Fargo"]


def _sample(model, tokenizer, temperature, group_size=4, max_new_tokens=12, eos=None, pad=None, seed=0, **kw):
    ids, mask = left_padded_prompts(tokenizer, PROMPTS)
    generator = torch.Generator().manual_seed(seed)
    return sample(
        model, ids, mask, group_size, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, **kw),
        eos_token_ids=[tokenizer.eos_token_id] if eos is None else eos,
        pad_token_id=tokenizer.pad_token_id if pad is None else pad, generator=generator,
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


def test_fallback_decoder_matches_fast_decoder(qwen_model, tokenizer, monkeypatch):
    fast = _sample(qwen_model, tokenizer, 0.0, group_size=2, max_new_tokens=8)
    import engine.rollout as rollout_module

    monkeypatch.setattr(rollout_module.KVDecoder, "supports", staticmethod(lambda model: False))
    slow = _sample(qwen_model, tokenizer, 0.0, group_size=2, max_new_tokens=8)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.old_logprobs, slow.old_logprobs, atol=1e-5, rtol=0)


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
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_rollout_concatenate_and_select(qwen_model, tokenizer):
    first = _sample(qwen_model, tokenizer, 1.0, group_size=2, max_new_tokens=5)
    second = _sample(qwen_model, tokenizer, 1.0, group_size=2, max_new_tokens=9, seed=1)
    both = Rollout.concatenate([first, second.select_rows(torch.tensor([2, 3]))])
    assert both.num_rows == 8 and both.completion_ids.shape[1] == second.completion_ids.shape[1]
    assert both.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not both.completion_mask[:6, 5:].any()
    assert torch.equal(both.completion_ids[6:], second.completion_ids[2:4])


class StaticKVDecoder(KVDecoder):
    """The graph-shaped decode step (what CUDA graphs capture), run eagerly on the CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, static_decode=True, graph_bucket=5)


@pytest.mark.parametrize("decoder", ["fast", "static", "fallback"])
def test_dropping_finished_rows_changes_no_row(untied_qwen_model, tokenizer, monkeypatch, decoder):
    # Rows end at different steps, so the sampler compacts the decoder batch mid-way.
    # Greedy rows must equal the same prompt decoded alone; sampled rows must keep
    # old_logprobs equal to the recompute.
    import engine.rollout as rollout_module

    qwen_model = untied_qwen_model
    if decoder == "fallback":
        monkeypatch.setattr(rollout_module.KVDecoder, "supports", staticmethod(lambda model: False))
    if decoder == "static":
        monkeypatch.setattr(rollout_module, "KVDecoder", StaticKVDecoder)
    free = _sample(qwen_model, tokenizer, 0.0, group_size=1, max_new_tokens=12, eos=[-1])
    def lengths_if_eos(token):  # where each row would stop if `token` were EOS
        rows = free.completion_ids.tolist()
        return [row.index(token) + 1 if token in row else 12 for row in rows]

    candidates = sorted(set(free.completion_ids.flatten().tolist()))
    eos = [next(t for t in candidates if len(set(lengths_if_eos(t))) > 1)]  # rows stop at different steps
    together = _sample(qwen_model, tokenizer, 0.0, group_size=1, max_new_tokens=12, eos=eos)
    assert together.completion_lengths.unique().numel() > 1
    ids, mask = left_padded_prompts(tokenizer, PROMPTS)
    for row, text in enumerate(PROMPTS):
        alone_ids, alone_mask = left_padded_prompts(tokenizer, [text])
        alone = sample(qwen_model, alone_ids, alone_mask, 1, SamplingConfig(max_new_tokens=12, temperature=0.0),
                       eos, tokenizer.pad_token_id)
        length = int(alone.completion_lengths[0])
        assert int(together.completion_lengths[row]) == length
        assert together.completion_ids[row, :length].tolist() == alone.completion_ids[0, :length].tolist()
    sampled = _sample(qwen_model, tokenizer, 1.0, group_size=4, max_new_tokens=16,
                      eos=[_frequent_token(qwen_model, tokenizer)])
    assert sampled.completion_lengths.unique().numel() > 1
    assert _max_recompute_gap(qwen_model, sampled) < 1e-5


def test_bf16_sampling_over_fp32_weights(qwen_model, tokenizer, monkeypatch):
    """SamplingConfig.dtype casts the decoder only: the model stays fp32, and the
    sampled log-probs stay within bf16 rounding of the fp32 recompute."""
    rollout = _sample(qwen_model, tokenizer, 1.0, dtype="bfloat16")
    assert next(qwen_model.parameters()).dtype == torch.float32
    assert make_decoder(qwen_model, 4, 16, "auto").dtype == torch.float32  # "auto" is bf16 on CUDA only
    assert rollout.old_logprobs.dtype == torch.float32
    assert rollout.completion_mask.any()
    assert _max_recompute_gap(qwen_model, rollout) < 0.03  # bf16 weights and cache vs fp32 (measured 0.005)

    with pytest.raises(ValueError, match="unknown rollout dtype"):
        SamplingConfig(dtype="fp8")
    import engine.rollout as rollout_module

    monkeypatch.setattr(rollout_module.KVDecoder, "supports", staticmethod(lambda model: False))
    with pytest.raises(ValueError, match=r"set the rollout dtype \(--set rollout_dtype=...\) to 'auto' or 'model'"):
        _sample(qwen_model, tokenizer, 1.0, dtype="bfloat16")
    # the transformers forward samples in the model's precision: "auto" and the model's own dtype are fine
    assert _sample(qwen_model, tokenizer, 1.0, dtype="float32").completion_mask.any()
    assert _sample(qwen_model, tokenizer, 1.0, dtype="auto").completion_mask.any()
