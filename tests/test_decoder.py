"""fastdecode/kv_decoder.py: KVDecoder logits == transformers forward on the full sequence."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fastdecode import KVDecoder
from engine.rollout import sample_exponential_race, sample_inverse_cdf
from tests.conftest import hf_logits

TOL = 1e-5
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, intermediate_size=128, max_position_embeddings=256)


def _qwen2(tie: bool, **kw):
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**SMALL, **kw}, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    return Qwen2ForCausalLM(cfg).eval()


def _llama(**kw):
    torch.manual_seed(1)
    cfg = LlamaConfig(**{**SMALL, **kw}, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    return LlamaForCausalLM(cfg).eval()


def _randomize(model):
    """Fresh random weights (incl. biases and norm weights, which init to 0/1)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


MODELS = {
    "qwen2_tied": lambda: _qwen2(True),
    "qwen2_untied": lambda: _qwen2(False),
    "llama": lambda: _llama(),
    "llama_bias_mha": lambda: _llama(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
    "llama3_rope_gqa4": lambda: LlamaForCausalLM(LlamaConfig(
        **{**SMALL, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16},
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})).eval(),
}


def _prompts(lengths, S, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = len(lengths)
    ids = torch.randint(3, vocab, (P, S), generator=g)
    mask = torch.zeros(P, S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, S - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)   # pad id 0, left padding
    return ids, mask


# "static" is the graph-shaped step (bucketed generated keys, masked, slot index on
# the device) run eagerly; a bucket of 4 makes the 6 steps cross a bucket boundary
# and the last bucket is cut at the cache's end (S + steps + 2 - S = 8).
DECODE_MODES = {"default": {}, "unpacked": dict(pack_weights=False),
                "static": dict(static_decode=True, graph_bucket=4)}


@pytest.mark.parametrize("mode", list(DECODE_MODES))
@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_and_decode_match_hf(name, mode):
    model = _randomize(MODELS[name]())
    assert KVDecoder.supports(model)
    V = model.config.vocab_size
    lengths, S, R, steps = [7, 3, 10], 10, 2, 6
    ids, mask = _prompts(lengths, S, V)
    P = len(lengths)
    dec = KVDecoder(model, max_batch_size=P * R, max_total_length=S + steps + 2, **DECODE_MODES[mode])

    logits = dec.prefill(ids, mask, repeats=R)
    assert logits.shape == (P * R, V) and logits.dtype == torch.float32
    ref = hf_logits(model, ids, mask)[:, -1]
    torch.testing.assert_close(logits, ref.repeat_interleave(R, 0), atol=TOL, rtol=0)

    # rows of a group get different tokens from here on
    full_ids = ids.repeat_interleave(R, 0)
    full_mask = mask.repeat_interleave(R, 0)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        tok = torch.randint(1, V, (P * R,), generator=g)
        full_ids = torch.cat([full_ids, tok[:, None]], 1)
        full_mask = torch.cat([full_mask, torch.ones(P * R, 1, dtype=torch.long)], 1)
        out = dec.decode(tok)
        ref = hf_logits(model, full_ids, full_mask)[:, -1]
        assert out.shape == (P * R, V) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_repeats_identical_within_group_and_same_tokens_stay_identical():
    model = _randomize(_qwen2(False))
    ids, mask = _prompts([5, 9, 2, 9], 9, model.config.vocab_size, seed=3)
    R = 4
    dec = KVDecoder(model, max_batch_size=16, max_total_length=16)
    logits = dec.prefill(ids, mask, repeats=R).view(4, R, -1)
    assert torch.equal(logits, logits[:, :1].expand_as(logits))
    assert not torch.allclose(logits[0, 0], logits[1, 0])
    tok = logits[:, 0].argmax(-1).repeat_interleave(R)
    out = dec.decode(tok).view(4, R, -1)
    assert torch.equal(out, out[:, :1].expand_as(out))


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_keep_rows_matches_hf(static):
    model = _randomize(_llama())
    V = model.config.vocab_size
    ids, mask = _prompts([4, 8, 6], 8, V, seed=5)
    R = 2
    dec = KVDecoder(model, max_batch_size=6, max_total_length=14, static_decode=static, graph_bucket=3)
    dec.prefill(ids, mask, repeats=R)
    full_ids, full_mask = ids.repeat_interleave(R, 0), mask.repeat_interleave(R, 0)
    g = torch.Generator().manual_seed(9)
    rows = torch.arange(6)
    for step in range(4):
        if step == 2:
            keep = torch.tensor([5, 0, 3])         # drop rows and reorder
            dec.keep_rows(keep)
            rows, full_ids, full_mask = rows[keep], full_ids[keep], full_mask[keep]
        tok = torch.randint(1, V, (len(rows),), generator=g)
        full_ids = torch.cat([full_ids, tok[:, None]], 1)
        full_mask = torch.cat([full_mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
        out = dec.decode(tok)
        torch.testing.assert_close(out, hf_logits(model, full_ids, full_mask)[:, -1], atol=TOL, rtol=0)


@pytest.mark.slow
def test_compiled_static_step_matches_hf():
    """The static step through torch.compile (dynamic shapes, no graph breaks) still equals the
    transformers forward, across bucket boundaries, a row drop and a second decoder of the same
    shape. "aot_eager" traces and functionalises the step as inductor does, without generating
    kernels (tests/test_cuda.py checks inductor's kernels on a GPU)."""
    model = _randomize(MODELS["llama3_rope_gqa4"]())
    V = model.config.vocab_size
    ids, mask = _prompts([7, 3, 10], 10, V, seed=2)
    R, steps = 2, 6
    for _ in range(2):  # the second decoder reuses the first one's compiled functions
        dec = KVDecoder(model, max_batch_size=6, max_total_length=ids.shape[1] + steps + 2, static_decode=True,
                        graph_bucket=4, pack_weights=False, compile_step="aot_eager")
        assert dec.compile_backend == "aot_eager" and dec.static_steps is not dec.eager_steps
        dec.prefill(ids, mask, repeats=R)
        full_ids, full_mask = ids.repeat_interleave(R, 0), mask.repeat_interleave(R, 0)
        generator = torch.Generator().manual_seed(7)
        for step in range(steps):
            if step == 3:
                keep = torch.tensor([5, 0, 3])  # drop rows and reorder: one row per prompt from here on
                dec.keep_rows(keep)
                full_ids, full_mask = full_ids[keep], full_mask[keep]
            tokens = torch.randint(1, V, (full_ids.shape[0],), generator=generator)
            full_ids = torch.cat([full_ids, tokens[:, None]], 1)
            full_mask = torch.cat([full_mask, torch.ones(full_ids.shape[0], 1, dtype=torch.long)], 1)
            torch.testing.assert_close(dec.decode(tokens), hf_logits(model, full_ids, full_mask)[:, -1],
                                       atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="static decode step"):
        KVDecoder(model, 2, 8, compile_step=True)  # CPU, no graphs: nothing static to compile
    with pytest.raises(ValueError, match="pack_weights=False"):
        KVDecoder(model, 2, 8, static_decode=True, compile_step=True, pack_weights=True)


def test_weights_snapshot_at_construction():
    model = _randomize(_qwen2(True))
    ids, mask = _prompts([3, 5], 5, model.config.vocab_size)
    dec = KVDecoder(model, 2, 8)
    before = dec.prefill(ids, mask, 1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    torch.testing.assert_close(dec.prefill(ids, mask, 1), before, atol=0, rtol=0)   # fused copies
    dec2 = KVDecoder(model, 2, 8)
    torch.testing.assert_close(dec2.prefill(ids, mask, 1), hf_logits(model, ids, mask)[:, -1], atol=TOL, rtol=0)


def test_supports_rejects_unsupported():
    assert not KVDecoder.supports(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))
    yarn = Qwen2Config(**SMALL, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                 "original_max_position_embeddings": 64})
    assert not KVDecoder.supports(Qwen2ForCausalLM(yarn))
    sliding = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert not KVDecoder.supports(Qwen2ForCausalLM(sliding))
    gelu = LlamaConfig(**SMALL, hidden_act="gelu")
    assert not KVDecoder.supports(LlamaForCausalLM(gelu))
    with pytest.raises(ValueError):
        KVDecoder(Qwen2ForCausalLM(yarn), 2, 8)


def test_bf16_close_to_hf():
    """Low-precision path (softmax in fp32): loose agreement with the bf16 transformers forward."""
    model = _randomize(_qwen2(False)).to(torch.bfloat16)
    V = model.config.vocab_size
    ids, mask = _prompts([6, 3], 6, V, seed=11)
    dec = KVDecoder(model, 4, 10)
    out = dec.prefill(ids, mask, repeats=2)
    ref = hf_logits(model, ids, mask)[:, -1].repeat_interleave(2, 0)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    tok = torch.tensor([5, 6, 7, 8])
    out = dec.decode(tok)
    ref = hf_logits(model, torch.cat([ids.repeat_interleave(2, 0), tok[:, None]], 1),
                     torch.cat([mask.repeat_interleave(2, 0), torch.ones(4, 1, dtype=torch.long)], 1))[:, -1]
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_decoder_dtype_casts_the_snapshot():
    """A bf16 decoder over fp32 weights computes exactly what a decoder over the bf16 model does."""
    model = _randomize(_qwen2(False))
    ids, mask = _prompts([6, 3], 6, model.config.vocab_size, seed=4)
    cast = KVDecoder(model, 4, 10, dtype=torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and cast.gk.dtype == torch.bfloat16
    model_bf16 = _randomize(_qwen2(False)).to(torch.bfloat16)
    # .to(bfloat16) also rounds the rotary module's inv_freq buffer; the cast decoder
    # keeps the fp32 model's (more exact) RoPE table, so give both the same one
    model_bf16.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    native = KVDecoder(model_bf16, 4, 10)
    torch.testing.assert_close(cast.prefill(ids, mask, 2), native.prefill(ids, mask, 2), atol=0, rtol=0)
    tokens = torch.tensor([5, 6, 7, 8])
    torch.testing.assert_close(cast.decode(tokens), native.decode(tokens), atol=0, rtol=0)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    with pytest.raises(ValueError, match="floating-point"):
        KVDecoder(model, 4, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="CUDA"):
        KVDecoder(model, 4, 10, cuda_graphs=True)


def test_decode_errors_name_the_problem():
    model = _randomize(_qwen2(True))
    ids, mask = _prompts([3, 2], 3, model.config.vocab_size)
    dec = KVDecoder(model, 2, 5, static_decode=True)
    dec.prefill(ids, mask, 1)
    with pytest.raises(ValueError, match="1 rows, 2 are active"):
        dec.decode(torch.tensor([4]))
    dec.decode(torch.tensor([4, 5]))
    dec.decode(torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="KV cache full"):
        dec.decode(torch.tensor([4, 5]))


@pytest.mark.parametrize("sampler", [sample_inverse_cdf, sample_exponential_race])
def test_sample_categorical_distribution(sampler):
    """Both exact samplers (inverse CDF on CPU, exponential race on CUDA) match the target
    frequencies within 0.012 (about 5 standard errors at n = 40,000) and never draw a
    zero-probability entry."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 12, generator=g), -1)
    probs[:, 0] = 0.0          # zero-probability entries (first, middle, last) are never drawn
    probs[:, 5] = 0.0
    probs[:, -1] = 0.0
    probs[2] *= 7.0            # unnormalised rows are fine
    n = 40000
    draws = sampler(probs.repeat(n, 1), generator=g).view(n, 3)
    target = probs / probs.sum(-1, keepdim=True)
    for r in range(3):
        freq = torch.bincount(draws[:, r], minlength=12).float() / n
        assert freq[[0, 5, 11]].sum() == 0
        assert (freq - target[r]).abs().max() < 0.012
