"""Shared fixtures: a locally trained tokenizer and tiny random Qwen2 / Llama models (CPU, fp32),
and the two references the decoder and sampler tests compare against."""

from contextlib import nullcontext

import pytest
import torch

from models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

CORPUS = [
    "Sort these digits in ascending order: 3 1 2",
    "1 2 3",
    "The Shawshank Redemption (1994)\nPulp Fiction (1994)\nFargo (1996)",
    "Recommend ten movies like Heat (1995) and Casino (1995).",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def make_model(tokenizer, architecture="qwen2", seed=0, tie=True):
    config = TinyModelConfig(architecture=architecture, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=128, tie_word_embeddings=tie)
    model = build_tiny_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed=seed)
    return model.eval()


@pytest.fixture(scope="session")
def qwen_model(tokenizer):
    return make_model(tokenizer, "qwen2")


@pytest.fixture(scope="session")
def untied_qwen_model(tokenizer):
    """Greedy tests use untied heads: a random tied model's argmax just repeats its input token."""
    return make_model(tokenizer, "qwen2", tie=False)


@pytest.fixture(scope="session")
def llama_model(tokenizer):
    return make_model(tokenizer, "llama", seed=1, tie=False)


def left_padded_prompts(tokenizer, texts):
    """Chat-formatted, left-padded prompt ids/mask [P, S] of mixed lengths."""
    from engine.tokens import encode_prompts

    chats = [[{"role": "user", "content": text}] for text in texts]
    return encode_prompts(tokenizer, chats, max_length=256, device=torch.device("cpu"))


@torch.no_grad()
def hf_logits(model, ids, mask):
    """Plain transformers forward over whole sequences, positions = cumsum(mask) - 1 passed explicitly."""
    mask = mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()


@torch.no_grad()
def recompute_gaps(model, rollout, chunk_size=128, autocast=False, logits_hook=None) -> tuple[float, float]:
    """(max, mean) |sampler log-prob - recomputed log-prob| over the completion tokens;
    `autocast`: recompute under CUDA bf16 autocast, as the learner does on GPUs; `logits_hook`: the
    sampler's constraint, applied to the recompute with the rollout's prompt indices."""
    from engine.logprobs import completion_logprobs

    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        recomputed = completion_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask,
            temperature=rollout.temperature, chunk_size=chunk_size, logits_hook=logits_hook,
            prompt_indices=rollout.prompt_indices if logits_hook is not None else None,
        ).logprobs
    gaps = (recomputed - rollout.old_logprobs).abs()[rollout.completion_mask]
    return float(gaps.max()), float(gaps.mean())
