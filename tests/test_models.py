"""Tiny models, the local tokenizer, and the checkpoint loader's errors."""

import pytest
import torch

from models.loader import ModelLoadError, load_model_and_tokenizer
from tests.conftest import make_model


def test_tokenizer_round_trip_and_chat_template(tokenizer, tmp_path):
    text = "The Shawshank Redemption (1994)\nFargo (1996)"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.padding_side == "left"


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_save_and_load_checkpoint(tokenizer, tmp_path, architecture):
    model = make_model(tokenizer, architecture)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_loader_errors_say_how_to_fix(tokenizer, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist and is not a hub id"):
        load_model_and_tokenizer(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path))
    make_model(tokenizer).save_pretrained(tmp_path)
    load_tokenizer = tokenizer.__class__.from_pretrained
    tokenizer.save_pretrained(tmp_path)
    saved = load_tokenizer(tmp_path)
    saved.chat_template = None
    saved.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_model_and_tokenizer(str(tmp_path))
    tokenizer.save_pretrained(tmp_path)
    saved = load_tokenizer(tmp_path)
    saved.pad_token = None
    saved.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no pad token"):
        load_model_and_tokenizer(str(tmp_path))
