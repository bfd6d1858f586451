"""Text <-> token tensors for the sampler, the learner and SFT.

Prompts are chat-templated and left-padded, completions right-padded and end with EOS. Masks, not token ids,
say what is real: the pad id may equal the EOS id. Details: docs/engine.md, section engine/tokens.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pad_token_lists(sequences: list[list[int]], pad_id: int, side: str, device) -> tuple[Tensor, Tensor]:
    """Pad token-id lists to one length on the `side` ("left" | "right"): ids [N, L], mask [N, L] bool."""
    length = max(len(sequence) for sequence in sequences)
    ids, mask = [], []
    for sequence in sequences:
        padding = [pad_id] * (length - len(sequence))
        real, blank = [True] * len(sequence), [False] * len(padding)
        ids.append(padding + sequence if side == "left" else sequence + padding)
        mask.append(blank + real if side == "left" else real + blank)
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.bool, device=device))


def encode_prompts(tokenizer, chats: list[list[dict]], max_length: int, device) -> tuple[Tensor, Tensor]:
    """Chat-template and left-pad prompts: ids [P, S], mask [P, S] bool. Long prompts keep their end."""
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:] for text in texts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encoded to zero tokens; check the task's messages")
    return pad_token_lists(encoded, tokenizer.pad_token_id, "left", device)


def encode_completions(tokenizer, texts: list[str], max_length: int, device) -> tuple[Tensor, Tensor]:
    """Right-padded completion ids [B, T] and mask [B, T] bool, each ending with EOS (unless cut)."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    return pad_token_lists([ids[:max_length] for ids in encoded], tokenizer.pad_token_id, "right", device)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def decode_completions(tokenizer, completion_ids: Tensor, completion_mask: Tensor, ended_with_eos: Tensor) -> list[str]:
    """Completion texts without the final stop token and padding."""
    texts = []
    for ids, length, ended in zip(completion_ids.tolist(), completion_mask.sum(dim=1).tolist(),
                                  ended_with_eos.tolist()):
        texts.append(tokenizer.decode(ids[: length - (1 if ended else 0)], skip_special_tokens=False))
    return texts
