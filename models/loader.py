"""Load a causal LM and its tokenizer from a local checkpoint folder or a hub id.

This is the ordinary transformers path (`AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`) with checks that turn the usual failure modes of an
RL run into one clear message each:

* the path does not exist and is not a hub id;
* the tokenizer has no chat template (a base model; prompts would be formatted wrongly);
* the tokenizer has no pad token (batched left padding is impossible).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.config import first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelLoadError(RuntimeError):
    """A checkpoint or tokenizer that recrl cannot train with; the message says how to fix it."""


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Raise `ModelLoadError` unless the tokenizer has a chat template, an EOS and a pad token."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer of {source} has no chat template; use an instruct/chat checkpoint, or set "
            "tokenizer.chat_template (a Jinja string) and save it with tokenizer.save_pretrained(...)"
        )
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"the tokenizer of {source} has no EOS token; set tokenizer.eos_token to the token that ends "
            "an assistant turn (e.g. '<|im_end|>') and save it"
        )
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(
            f"the tokenizer of {source} has no pad token; set tokenizer.pad_token (the EOS token is fine: "
            "recrl masks decide what counts) and save it with tokenizer.save_pretrained(...)"
        )


def load_model_and_tokenizer(
    path_or_id: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` for a local checkpoint folder or a hub id.

    The tokenizer is set to left padding (prompts are left-padded for batched sampling).
    """
    is_local = os.path.isdir(path_or_id)
    if not is_local:
        if os.path.exists(path_or_id):
            raise ModelLoadError(f"{path_or_id} is a file; pass the checkpoint folder that holds config.json")
        if not _HUB_ID.match(path_or_id):
            raise ModelLoadError(
                f"model path {path_or_id!r} does not exist and is not a hub id of the form 'owner/name'; "
                "pass a folder written by save_pretrained or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
            )
    elif not (Path(path_or_id) / "config.json").exists():
        raise ModelLoadError(
            f"{path_or_id} has no config.json; pass a folder written by model.save_pretrained(...)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype)
    except OSError as error:
        where = "the folder" if is_local else "the hub (is the network reachable and the id right?)"
        raise ModelLoadError(f"could not load {path_or_id!r} from {where}: {error}") from error
    except (ValueError, RuntimeError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
        # an unknown model_type, weights that do not fit its config (vocabulary size), a damaged weights file
        raise ModelLoadError(f"could not load {path_or_id!r}: {type(error).__name__}: {first_line(error)}; check its "
                             "config.json and weights, or save the model again with save_pretrained(...)") from error
    check_tokenizer(tokenizer, path_or_id)
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder block's activations in the backward pass (transformers 5 and 4 names)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
