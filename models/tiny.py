"""Small decoder models and a locally trained tokenizer.

Pretrained checkpoints cannot be downloaded everywhere recrl runs (CI, air-gapped
machines), so every experiment can build its own model and tokenizer:

* `build_tiny_model` makes a randomly initialised Qwen2 (default) or Llama decoder
  from a transformers config: the same architecture code as the real checkpoints,
  only smaller.
* `train_tokenizer` trains a byte-level BPE tokenizer with the `tokenizers` library
  on the experiment's own text and wraps it as a `PreTrainedTokenizerFast` with pad
  and EOS tokens and a ChatML chat template, so it is saved and reloaded with
  `save_pretrained` / `from_pretrained` like any hub tokenizer.

The chat template is Qwen's ChatML without the default system prompt:

    <|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>

`<|im_end|>` is the end-of-sequence token a policy must learn to emit;
`<|endoftext|>` pads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from engine.config import check, check_choice

ARCHITECTURES = ("qwen2", "llama")
PAD_TOKEN = "<|endoftext|>"
CHAT_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, CHAT_START_TOKEN, EOS_TOKEN]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TinyModelConfig:
    """Dimensions of a small decoder. Defaults are config C0 of the benchmarks."""

    architecture: str = "qwen2"  # "qwen2" | "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        check_choice("architecture", self.architecture, ARCHITECTURES)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
              f"must be a multiple of num_heads ({self.num_heads}): hidden_size = num_heads * head_dim")
        check(self.hidden_size // self.num_heads % 2 == 0, "hidden_size", self.hidden_size,
              f"hidden_size / num_heads = {self.hidden_size // self.num_heads} must be even (RoPE rotates pairs)")
        check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
              f"must divide num_heads ({self.num_heads})")
        check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")


def build_tiny_model(
    config: TinyModelConfig,
    vocab_size: int,
    pad_token_id: int,
    eos_token_id: int,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Qwen2 or Llama causal LM with the given dimensions (fp32)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    hf_config = Qwen2Config(**common) if config.architecture == "qwen2" else LlamaConfig(**common)
    # Initialisation draws from the global torch RNG: fork it so building a model
    # never changes the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; pad/EOS tokens and a ChatML template included.

    Training is deterministic for the same texts in the same order.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus: pass the experiment's prompts and answers")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
