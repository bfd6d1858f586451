"""The R²ec item head: scores and in-batch item policy against numpy and hand-computed values,
the item encoder against the decoder's last_hidden_state, and the item table's bookkeeping."""

import math

import numpy as np
import pytest
import torch

from models.rec_head import ItemScorer, ItemTable, RecHeadConfig, encode_items
from models.tiny import train_tokenizer
from tests.conftest import CORPUS, make_model

ITEM_CORPUS = CORPUS + [
    "Summarize key attributes of the following movie inside <answer> and </answer>.",
    "<answer>Heat (1995)</answer>",
] * 20


@pytest.fixture(scope="module")
def answer_tokenizer():
    return train_tokenizer(ITEM_CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def answer_model(answer_tokenizer):
    return make_model(answer_tokenizer, "qwen2")


def numpy_scores(users, items, similarity, temperature):
    if similarity == "cosine":
        users = users / np.linalg.norm(users, axis=1, keepdims=True)
        items = items / np.linalg.norm(items, axis=1, keepdims=True)
    return users @ items.T / temperature


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_scores_match_numpy(similarity):
    generator = np.random.default_rng(0)
    users, items = generator.normal(size=(3, 8)), generator.normal(size=(5, 8))
    scorer = ItemScorer(RecHeadConfig(similarity=similarity, temperature=0.5))
    scores = scorer(torch.tensor(users, dtype=torch.float32), torch.tensor(items, dtype=torch.bfloat16))
    assert scores.dtype == torch.float32 and scores.shape == (3, 5)
    items_as_bf16 = torch.tensor(items, dtype=torch.bfloat16).double().numpy()
    np.testing.assert_allclose(scores.numpy(), numpy_scores(users, items_as_bf16, similarity, 0.5), rtol=1e-4,
                               atol=1e-4)
    assert list(scorer.parameters()) == []


def test_default_head_is_cosine_over_0_02():
    users, items = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0], [0.0, -2.0]])
    np.testing.assert_allclose(ItemScorer()(users, items).numpy(), [[24 / 25 / 0.02, -4 / 5 / 0.02]], rtol=1e-6)


def test_learnable_temperature():
    scorer = ItemScorer(RecHeadConfig(similarity="cosine", temperature=0.1, learn_temperature=True))
    parameters = list(scorer.parameters())
    assert len(parameters) == 1
    users, items = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    scores = scorer(users, items)
    np.testing.assert_allclose(scores.detach().numpy(), [[6.0, 10.0]], rtol=1e-5)
    scores.sum().backward()
    # d/d(log tau) of sum_v cos_v / tau = -sum_v cos_v / tau
    assert parameters[0].grad.item() == pytest.approx(-16.0, rel=1e-5)


def test_in_batch_logprobs_match_numpy():
    generator = np.random.default_rng(1)
    users, targets = generator.normal(size=(6, 4)), generator.normal(size=(3, 4))
    target_index = np.array([0, 0, 1, 2, 2, 1])
    scorer = ItemScorer(RecHeadConfig(temperature=0.3))
    logprobs = scorer.in_batch_item_logprobs(torch.tensor(users), torch.tensor(targets), torch.tensor(target_index))
    logits = numpy_scores(users, targets, "cosine", 0.3)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(logprobs.numpy(), log_softmax[np.arange(6), target_index], rtol=1e-5)
    with pytest.raises(ValueError, match="target_index"):
        scorer.in_batch_item_logprobs(torch.tensor(users), torch.tensor(targets), torch.tensor([0, 0, 1, 2, 2, 3]))


def test_item_loss_gradient_oracle():
    """Logits [1, 0, -1] -> p = [0.66524, 0.24473, 0.09003]; the loss -A p0 / p0.detach() of the best path
    has d loss / d logits = -A (onehot(0) - p) = [-0.43683, 0.31935, 0.11748] for A = 1.3049."""
    advantage = 1.3049
    expected_probabilities = [0.66524, 0.24473, 0.09003]
    expected_gradient = [-0.43683, 0.31935, 0.11748]
    # cosine: cos = [0.02, 0, -0.02] with tau = 0.02
    side = math.sqrt(1 - 0.02**2)
    user = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[0.02, side], [0.0, 1.0], [-0.02, side]])
    logprob = ItemScorer().in_batch_item_logprobs(user, items, torch.tensor([0]))
    np.testing.assert_allclose(ItemScorer()(user, items).numpy(), [[1.0, 0.0, -1.0]], atol=1e-5)
    assert logprob.exp().item() == pytest.approx(expected_probabilities[0], abs=1e-5)
    # dot: items = identity, so logits = user / tau and d loss / d logits = tau * d loss / d user
    temperature = 0.02
    user = torch.tensor([[1.0, 0.0, -1.0]]) * temperature
    user.requires_grad_(True)
    scorer = ItemScorer(RecHeadConfig(similarity="dot", temperature=temperature))
    logprob = scorer.in_batch_item_logprobs(user, torch.eye(3), torch.tensor([0]))
    probability = logprob.exp()
    loss = -(advantage * probability / probability.detach()).sum()
    loss.backward()
    np.testing.assert_allclose(torch.softmax(scorer(user, torch.eye(3)), dim=1).detach().numpy(),
                               [expected_probabilities], atol=1e-5)
    np.testing.assert_allclose((user.grad * temperature).numpy(), [expected_gradient], atol=1e-5)


def test_scorer_rejects_bad_settings():
    with pytest.raises(ValueError, match="similarity"):
        ItemScorer(RecHeadConfig(similarity="l2"))
    with pytest.raises(ValueError, match="temperature"):
        ItemScorer(RecHeadConfig(temperature=0.0))
    with pytest.raises(ValueError, match="hidden sizes differ"):
        ItemScorer()(torch.zeros(2, 4), torch.zeros(3, 5))


ITEM_PROMPTS = [
    [{"role": "user", "content": "Summarize key attributes of the following movie inside <answer> and </answer>."
                                 "\nTitle: Heat (1995)"}],
    [{"role": "user", "content": "Fargo (1996)"}],
    [{"role": "user", "content": "Summarize key attributes of the following movie: Pulp Fiction (1994)"}],
]


def test_encoder_matches_the_decoder_last_hidden_state(answer_tokenizer, answer_model):
    hidden = encode_items(answer_model, answer_tokenizer, ITEM_PROMPTS, batch_size=3)
    assert hidden.shape == (3, answer_model.config.hidden_size)
    assert not hidden.requires_grad
    lengths = []
    for row, messages in enumerate(ITEM_PROMPTS):
        text = answer_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        ids = answer_tokenizer(text + "<answer>", add_special_tokens=False, return_tensors="pt")["input_ids"]
        lengths.append(ids.shape[1])
        with torch.no_grad():
            alone = answer_model.model(input_ids=ids).last_hidden_state[0, -1]  # unpadded, one prompt
        torch.testing.assert_close(hidden[row], alone, atol=1e-5, rtol=1e-5)
    assert len(set(lengths)) == 3  # mixed lengths: the batch really was left-padded
    one_by_one = encode_items(answer_model, answer_tokenizer, ITEM_PROMPTS, batch_size=1)
    torch.testing.assert_close(hidden, one_by_one, atol=1e-5, rtol=1e-5)


def test_encoder_takes_one_prefill_per_prompt(answer_tokenizer, answer_model):
    """A user's written reasoning + "<answer>" as the prefill gives h_T at the end of that text."""
    prefills = ["Heat is a crime film <answer>", "<answer>", "Fargo (1996)<answer>"]
    hidden = encode_items(answer_model, answer_tokenizer, ITEM_PROMPTS, batch_size=2, prefill_answer=prefills)
    for row, (messages, prefill) in enumerate(zip(ITEM_PROMPTS, prefills)):
        text = answer_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
        ids = answer_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = answer_model.model(input_ids=ids).last_hidden_state[0, -1]
        torch.testing.assert_close(hidden[row], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one per prompt"):
        encode_items(answer_model, answer_tokenizer, ITEM_PROMPTS, prefill_answer=prefills[:2])


def test_encoder_keeps_the_graph_when_asked(answer_tokenizer, answer_model):
    hidden = encode_items(answer_model, answer_tokenizer, ITEM_PROMPTS[:2], batch_size=2, with_grad=True)
    assert hidden.requires_grad
    hidden.sum().backward()
    assert answer_model.model.norm.weight.grad is not None
    answer_model.zero_grad(set_to_none=True)


def test_encoder_rejects_bad_prompts(answer_tokenizer, answer_model):
    with pytest.raises(ValueError, match="user turn"):
        encode_items(answer_model, answer_tokenizer, [[{"role": "assistant", "content": "x"}]])
    with pytest.raises(ValueError, match="no item prompts"):
        encode_items(answer_model, answer_tokenizer, [])


def test_table_refresh_schedule_and_overwrite():
    table = ItemTable(num_items=4, hidden_size=3)
    with pytest.raises(RuntimeError, match="empty"):
        _ = table.hidden
    assert table.due(step=7, every=5)  # an empty table is always due
    encoded = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    table.refresh(lambda: encoded.clone().requires_grad_(True), step=7)
    assert table.last_refresh_step == 7
    assert isinstance(table.last_refresh_seconds, float) and table.last_refresh_seconds >= 0
    assert not table.hidden.requires_grad
    assert [step for step in range(7, 21) if table.due(step, every=5)] == [10, 15, 20]
    table.refresh(lambda: encoded.clone(), step=10)
    assert not table.due(10, every=5)  # not twice in one step
    fresh = torch.full((3, 3), -1.0, requires_grad=True)
    rows = fresh * torch.tensor([[1.0], [2.0], [3.0]])  # rows -1, -2, -3
    table.overwrite(torch.tensor([2, 0, 2]), rows)  # item 2 appears twice: its last row wins
    expected = encoded.clone()
    expected[0] = -2.0
    expected[2] = -3.0
    torch.testing.assert_close(table.hidden, expected)
    assert not table.hidden.requires_grad
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        table.overwrite(torch.tensor([4]), torch.zeros(1, 3))


def test_table_state_round_trip():
    table = ItemTable(num_items=3, hidden_size=2)
    table.refresh(lambda: torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), step=4)
    state = table.state_dict()
    restored = ItemTable(num_items=3, hidden_size=2)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.hidden, table.hidden, atol=0, rtol=0)
    assert restored.last_refresh_step == 4 and restored.last_refresh_seconds == table.last_refresh_seconds
    assert not restored.due(4, every=2) and restored.due(6, every=2)
    table.overwrite(torch.tensor([1]), torch.zeros(1, 2))  # the saved state is a copy
    assert state["hidden"][1].abs().sum() > 0


def test_table_hidden_size_mismatch_is_a_clear_error(answer_tokenizer, answer_model):
    model_size = answer_model.config.hidden_size
    table = ItemTable(num_items=3, hidden_size=model_size + 1)
    with pytest.raises(ValueError, match="hidden size"):
        table.refresh(lambda: encode_items(answer_model, answer_tokenizer, ITEM_PROMPTS), step=0)
    good = ItemTable(num_items=3, hidden_size=model_size)
    good.refresh(lambda: encode_items(answer_model, answer_tokenizer, ITEM_PROMPTS), step=0)
    with pytest.raises(ValueError, match="hidden size"):
        table.load_state_dict(good.state_dict())
    with pytest.raises(ValueError, match="hidden size"):
        good.overwrite(torch.tensor([0]), torch.zeros(1, model_size + 1))
