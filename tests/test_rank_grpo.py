"""Rank-GRPO: token -> rank segmentation on real tokenizers, the worked examples of docs/rank_grpo.md §8,
length shaping, the geometric-mean rank ratio and its gradient (through `policy_loss`), and a learner smoke test."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from algorithms.base import newline_counts
from algorithms.rank_grpo import RankGRPO, RankGRPOConfig
from engine.learner import Learner, LearnerConfig, PolicyBatch, Rewards
from engine.loss import LossConfig, clipped_surrogate, policy_loss, unit_mean
from engine.rollout import Rollout, SamplingConfig, sample
from models.tiny import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, train_tokenizer
from tests.conftest import left_padded_prompts, make_model

TITLES = ["Heat (1995)", "Casino (1995)", "Fargo (1996)", "Alien (1979)", "Se7en (1995)",
          "Up (2009)", "Her (2013)", "Jaws (1975)"]
# Qwen2's pre-tokenizer split: punctuation may carry trailing newlines (")\n"), newline runs merge.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _list_corpus():
    rng = random.Random(0)
    corpus = []
    for _ in range(200):
        separator = rng.choice(["\n", "\n\n"])
        corpus.append(separator.join(rng.sample(TITLES, 5)) + "\n\n")
    return corpus


@pytest.fixture(scope="module")
def list_tokenizer():
    """`train_tokenizer` on "Title (Year)" lists: its GPT-2 split merges "\\n\\n" (at the end of a text)."""
    return train_tokenizer(_list_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def qwen_style_tokenizer():
    """Byte-level BPE with Qwen2's split regex, so ")\\n" and ")\\n\\n" become single tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_list_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------
# helpers (independent of the implementation)
# ---------------------------------------------------------------------------


def _encode(tokenizer, text, eos=True):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def _rollout(rows, ended_with_eos, pad_id=0, group_ids=None):
    """A minimal right-padded Rollout from lists of completion ids."""
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_id] * (length - len(row)) for row in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows], dtype=torch.bool)
    batch = len(rows)
    return Rollout(
        prompt_ids=torch.zeros(batch, 1, dtype=torch.long),
        prompt_mask=torch.ones(batch, 1, dtype=torch.bool),
        completion_ids=ids,
        completion_mask=mask,
        old_logprobs=torch.zeros(batch, length),
        group_ids=torch.zeros(batch, dtype=torch.long) if group_ids is None else torch.tensor(group_ids),
        prompt_indices=torch.full((batch,), -1),
        ended_with_eos=torch.tensor(ended_with_eos, dtype=torch.bool),
        temperature=1.0,
    )


def _expected_ranks(tokenizer, rows, list_length, length):
    """Rank of token t = newlines in the decoded text of the tokens before t, clamped to N; -1 on padding."""
    expected = np.full((len(rows), length), -1)
    for b, row in enumerate(rows):
        for t in range(len(row)):
            prefix = tokenizer.decode(row[:t], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            expected[b, t] = min(prefix.count("\n"), list_length)
    return expected


def _rewards(rows, list_length, values=None):
    """Per-rank rewards [rows, N]: N, the list length, is what the strategy reads from them."""
    return Rewards.from_tensor(torch.zeros(rows, list_length) if values is None else torch.as_tensor(values))


def _token_texts(tokenizer, ids):
    return [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]


def _check_segmentation(tokenizer, rows, list_length, ended_with_eos=None):
    ended_with_eos = [True] * len(rows) if ended_with_eos is None else ended_with_eos
    rollout = _rollout(rows, ended_with_eos, pad_id=tokenizer.pad_token_id)
    unit_ids = RankGRPO(tokenizer=tokenizer).unit_ids(rollout, _rewards(len(rows), list_length))
    expected = _expected_ranks(tokenizer, rows, list_length, rollout.completion_ids.shape[1])
    np.testing.assert_array_equal(unit_ids.numpy(), expected)
    return unit_ids


# ---------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------


def test_newline_table_counts_every_newline_and_ignores_special_tokens(tokenizer, qwen_style_tokenizer):
    for tok in (tokenizer, qwen_style_tokenizer):
        counts = newline_counts(tok)
        assert counts.shape == (len(tok),)
        for token_id in range(len(tok)):
            text = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(token_id)])
            expected = 0 if token_id in tok.all_special_ids else text.count("\n")
            assert int(counts[token_id]) == expected, (token_id, text)
        assert int(counts[tok.eos_token_id]) == 0


def test_segmentation_single_newline_tokens(tokenizer):
    n = 3
    texts = [
        "Fargo (1996)\nHeat (1995)\nCasino (1995)",  # exactly N: EOS in rank N-1
        "Fargo (1996)\nHeat (1995)",  # fewer items
        "Fargo (1996)\nHeat (1995)\nCasino (1995)\n",  # trailing newline: EOS in overflow
        "Fargo (1996)\n\nHeat (1995)\nCasino (1995)",  # blank line: "\n", "\n" adds 2
        "Fargo (1996)\nHeat (1995)\nCasino (1995)\nPulp Fiction (1994)\nHeat (1995)",  # overflow
    ]
    rows = [_encode(tokenizer, text) for text in texts]
    unit_ids = _check_segmentation(tokenizer, rows, n)
    lengths = [len(row) for row in rows]
    eos_ranks = [int(unit_ids[b, lengths[b] - 1]) for b in range(len(rows))]
    assert eos_ranks == [2, 1, 3, 3, 3]
    # The newline token belongs to the item it ends.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    first_newline = rows[0].index(newline)
    assert int(unit_ids[0, first_newline]) == 0 and int(unit_ids[0, first_newline + 1]) == 1
    # Padding is -1, overflow is one shared bin N.
    assert int(unit_ids[1, -1]) == -1 and int(unit_ids.max()) == n


def test_segmentation_with_merged_blank_line_token(list_tokenizer):
    tok = list_tokenizer
    double = [i for i in range(len(tok)) if tok.decode([i]) == "\n\n"]
    assert double, "the list corpus should teach a '\\n\\n' token"
    n = 4
    heat, up, alien = (tok(text, add_special_tokens=False)["input_ids"]
                       for text in ("Heat (1995)", "Up (2009)", "Alien (1979)"))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    rows = [
        _encode(tok, "Heat (1995)\nUp (2009)\n\n"),  # trailing "\n\n" encodes to the merged token
        heat + double + up + newline + alien + [tok.eos_token_id],  # blank line inside the list
        heat + double + up + double + alien + [tok.eos_token_id],  # "\n\n" twice: EOS in overflow (ranks 0, 2, 4)
    ]
    assert double[0] in rows[0], "the encoded completion should hold the merged '\\n\\n' token"
    unit_ids = _check_segmentation(tok, rows, n)
    assert int(unit_ids[0, len(rows[0]) - 1]) == 3  # EOS after "\n\n" at rank 1 + 2
    assert int(unit_ids[1, len(rows[1]) - 1]) == 3  # EOS in rank N-1 although only 3 titles
    assert int(unit_ids[2, len(rows[2]) - 1]) == n  # overflow bin


def test_segmentation_with_merged_paren_newline_tokens(qwen_style_tokenizer):
    tok = qwen_style_tokenizer
    paren_newline = [i for i in range(len(tok)) if tok.decode([i]) == ")\n"]
    paren_blank = [i for i in range(len(tok)) if tok.decode([i]) == ")\n\n"]
    assert paren_newline and paren_blank
    n = 3
    texts = [
        "Heat (1995)\nUp (2009)\nAlien (1979)",  # exactly N
        "Heat (1995)\nUp (2009)\nAlien (1979)\n",  # trailing newline merged into ")\n"
        "Heat (1995)\n\nUp (2009)\nAlien (1979)",  # ")\n\n" adds 2: EOS lands in overflow
        "Heat (1995)\nUp (2009)\nAlien (1979)\nJaws (1975)\nHer (2013)",  # overflow
        "Heat (1995)\nUp (2009)",  # fewer items
    ]
    rows = [_encode(tok, text) for text in texts]
    assert paren_newline[0] in rows[0] and paren_blank[0] in rows[2]
    assert all(tok.decode([i]) != "\n" for i in rows[0]), "newlines should only come merged here"
    unit_ids = _check_segmentation(tok, rows, n)
    eos_ranks = [int(unit_ids[b, len(rows[b]) - 1]) for b in range(len(rows))]
    assert eos_ranks == [2, 3, 3, 3, 1]
    # The merged ")\n" token ends its item: it is in rank 0, the next title starts rank 1.
    position = rows[0].index(paren_newline[0])
    assert unit_ids[0, position].item() == 0 and unit_ids[0, position + 1].item() == 1


def test_segmentation_of_truncated_rows_and_padding(qwen_style_tokenizer):
    tok = qwen_style_tokenizer
    rows = [_encode(tok, "Heat (1995)\nUp (2009)", eos=False), _encode(tok, "Heat (1995)")]
    _check_segmentation(tok, rows, 2, ended_with_eos=[False, True])


def test_needs_a_tokenizer_and_takes_n_from_the_rewards(tokenizer):
    rollout = _rollout([_encode(tokenizer, "Heat (1995)\nFargo (1996)\nAlien (1979)")], [True])
    with pytest.raises(ValueError, match="tokenizer"):
        RankGRPO()
    strategy = RankGRPO(tokenizer=tokenizer)
    for n in (2, 3):
        rewards = _rewards(1, n)
        assert strategy.num_units(rewards) == n
        assert int(strategy.unit_ids(rollout, rewards).max()) == 2  # overflow bin n = 2, or the last rank of 3


# ---------------------------------------------------------------------------
# advantages: worked example A of docs/rank_grpo.md §8
# ---------------------------------------------------------------------------

HITS_A = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=float)


def _log_decay(hits):
    n = hits.shape[1]
    discounts = 1.0 / np.log2(np.arange(1, n + 1) + 1.0)
    discounts[0] = 1.0
    return np.cumsum((hits * discounts)[:, ::-1], axis=1)[:, ::-1].copy()  # r_k = sum_{j >= k} rel_j d_j


def _three_item_rollout(tokenizer, rows=4):
    text = "Fargo (1996)\nHeat (1995)\nCasino (1995)"
    return _rollout([_encode(tokenizer, text)] * rows, [True] * rows, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("reward, expected", [
    ("exp_inf", [[0.865875, -0.865875, 0], [-0.865875, 0.865875, 0], [-0.865875, -0.865875, 0],
                 [0.865875, 0.865875, 0]]),
    ("log_decay", [[0.270278, -0.865788, 0], [-0.270278, 0.865788, 0], [-1.194366, -0.865788, 0],
                   [1.194366, 0.865788, 0]]),
])
def test_example_a_per_rank_advantages(tokenizer, reward, expected):
    rewards = HITS_A if reward == "exp_inf" else _log_decay(HITS_A)
    if reward == "log_decay":
        np.testing.assert_allclose(rewards, [[1, 0, 0], [0.630930, 0.630930, 0], [0, 0, 0],
                                             [1.630930, 0.630930, 0]], atol=1e-6)
    rollout = _three_item_rollout(tokenizer)
    strategy = RankGRPO(tokenizer=tokenizer)
    rank_rewards = _rewards(4, 3, rewards)
    unit_ids = strategy.unit_ids(rollout, rank_rewards)
    advantages = strategy.advantages(rank_rewards, rollout, unit_ids)
    eos = rollout.completion_lengths - 1
    for b in range(4):
        for k in range(3):
            tokens = (unit_ids[b] == k).nonzero().squeeze(1)
            tokens = tokens[tokens != eos[b]]
            np.testing.assert_allclose(advantages[b, tokens].numpy(), expected[b][k], atol=2e-6)
        assert float(advantages[b, eos[b]]) == pytest.approx(0.1)  # exact length: EOS bonus only


# ---------------------------------------------------------------------------
# length shaping
# ---------------------------------------------------------------------------


def test_length_shaping_cases(tokenizer):
    n = 3
    cases = [
        ("Fargo (1996)\nHeat (1995)\nCasino (1995)", True),  # exact N: EOS +0.1
        ("Fargo (1996)\nHeat (1995)", True),  # fewer items: EOS -0.1
        ("Fargo (1996)\nHeat (1995)\nCasino (1995)\n", True),  # trailing newline: EOS is overflow, -0.1
        ("Fargo (1996)\nHeat (1995)\nCasino (1995)\nPulp Fiction (1994)\nHeat (1995)", True),  # overflow -0.1
        ("Fargo (1996)\nHeat (1995)", False),  # truncated: no EOS term
        ("Fargo (1996)\nHeat (1995)\nCasino (1995)\nPulp Fiction (1994)", False),  # truncated in overflow
    ]
    rows = [_encode(tokenizer, text, eos=ended) for text, ended in cases]
    ended = [e for _, e in cases]
    rollout = _rollout(rows, ended, pad_id=tokenizer.pad_token_id, group_ids=[0, 0, 0, 1, 1, 1])
    rng = np.random.default_rng(0)
    rewards = rng.random((len(rows), n))
    # Per-rank group advantages written out with numpy: groups {0, 1, 2} and {3, 4, 5}.
    rank_adv = np.zeros_like(rewards)
    for group in (slice(0, 3), slice(3, 6)):
        r = rewards[group]
        rank_adv[group] = (r - r.mean(axis=0)) / (r.std(axis=0, ddof=1) + 1e-4)
    ranks = _expected_ranks(tokenizer, rows, n, rollout.completion_ids.shape[1])

    for shaping in (True, False):
        strategy = RankGRPO(RankGRPOConfig(length_shaping=shaping), tokenizer=tokenizer)
        rank_rewards = _rewards(len(rows), n, rewards)
        unit_ids = strategy.unit_ids(rollout, rank_rewards)
        advantages = strategy.advantages(rank_rewards, rollout, unit_ids).numpy()
        expected = np.zeros_like(advantages)
        for b, row in enumerate(rows):
            for t in range(len(row)):
                is_eos = ended[b] and t == len(row) - 1
                k = ranks[b, t]
                value = 0.0 if (is_eos or k == n) else rank_adv[b, k]
                if shaping and k == n:
                    value -= 0.1
                if shaping and is_eos and k == n - 1:
                    value += 0.1
                if shaping and is_eos and k < n - 1:
                    value -= 0.1
                expected[b, t] = value
        np.testing.assert_allclose(advantages, expected, atol=1e-5)
        eos_values = [advantages[b, len(rows[b]) - 1] for b in range(3)]
        if shaping:
            np.testing.assert_allclose(eos_values, [0.1, -0.1, -0.1], atol=1e-7)
            overflow = ranks[3] == n
            assert overflow.sum() > 3
            np.testing.assert_allclose(advantages[3, overflow], -0.1, atol=1e-7)
            assert advantages[4, len(rows[4]) - 1] == pytest.approx(rank_adv[4, 1], abs=1e-5)  # truncated
        else:
            np.testing.assert_allclose(eos_values, 0.0)
    assert (advantages[ranks == -1] == 0).all()


def test_reward_shape_errors(tokenizer):
    rollout = _three_item_rollout(tokenizer)
    strategy = RankGRPO(tokenizer=tokenizer)
    unit_ids = strategy.unit_ids(rollout, _rewards(4, 3))
    with pytest.raises(ValueError, match=r"grpo.*\(4, 1\)|\(4, 1\).*grpo"):
        strategy.advantages(Rewards.from_tensor(torch.ones(4)), rollout, unit_ids)  # one reward per completion
    partial = Rewards(torch.ones(4, 3), torch.tensor([[True, True, False]] * 4))
    with pytest.raises(ValueError, match="masked ranks"):
        strategy.advantages(partial, rollout, unit_ids)


# ---------------------------------------------------------------------------
# rank ratio: example B, mu = 1 and mu = 2
# ---------------------------------------------------------------------------


def _rank_loss(logprobs, old, advantages, mask, unit_ids, mode, num_units, low=0.06, high=0.08):
    """The loss the learner computes for Rank-GRPO: `policy_loss` with the strategy's unit ratio."""
    config = LossConfig(clip_ratio_low=low, clip_ratio_high=high, loss_agg_mode=mode)
    return policy_loss(logprobs, old, advantages, mask, config, unit_ids=unit_ids, ratio_level=RankGRPO.ratio_level,
                       num_units=num_units)


def test_example_b_through_the_strategy():
    log_ratio = torch.tensor([[0.10, -0.05, 0.02, 0.30, 0.00]], dtype=torch.float64)
    unit_ids = torch.tensor([[0, 0, 0, 1, 1]])
    advantages = torch.tensor([[0.8, 0.8, 0.8, -0.5, -0.5]], dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.bool)
    pooled = unit_mean(log_ratio, unit_ids, num_units=2)
    np.testing.assert_allclose(pooled[0].numpy(), [0.023333] * 3 + [0.15] * 2, atol=1e-6)
    np.testing.assert_allclose(pooled[0, [0, 3]].exp().numpy(), [1.023608, 1.161834], atol=1e-6)
    per_token, _ = clipped_surrogate(pooled, advantages, 0.06, 0.08)
    np.testing.assert_allclose(-per_token[0, [0, 3]].numpy(), [0.818886, -0.580917], atol=1e-6)
    zeros = torch.zeros_like(log_ratio)
    paper, metrics = _rank_loss(log_ratio, zeros, advantages, mask, unit_ids, "seq_mean_unit_mean", 2)
    code, _ = _rank_loss(log_ratio, zeros, advantages, mask, unit_ids, "token_mean", 2)
    assert float(paper) == pytest.approx(-0.118985, abs=1e-6)
    assert float(code) == pytest.approx(-0.258965, abs=1e-6)
    assert float(metrics["ratio_max"]) == pytest.approx(1.161834, abs=1e-6)
    assert float(metrics["clipped_tokens"]) == 0  # 1.1618 > 1.08 but A < 0: the pessimistic min keeps it


# Three rows, N = 3, overflow bin 3, padding -1.
UNITS = np.array([
    [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, -1, -1],
    [0, 0, 1, 1, 1, 1, 2, -1, -1, -1, -1, -1],
    [0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3],
])


def test_on_policy_rank_ratio_is_exactly_one_and_gradient_uses_rank_mean_advantage():
    rng = np.random.default_rng(2)
    unit_ids = torch.tensor(UNITS)
    mask = unit_ids >= 0
    logprobs = torch.tensor(-rng.random(UNITS.shape), requires_grad=True)
    advantages = torch.tensor(rng.normal(size=UNITS.shape)) * mask
    loss, metrics = _rank_loss(logprobs, logprobs.detach(), advantages, mask, unit_ids, "token_mean", 3)
    assert float(metrics["ratio_max"]) == float(metrics["ratio_min"]) == 1.0
    assert float(metrics["clipped_tokens"]) == 0
    loss.backward()
    # d loss / d logp_s = -(1 / total tokens) * mean of A over the tokens of s's rank (§1.8).
    adv = advantages.numpy()
    expected = np.zeros(UNITS.shape)
    for b in range(UNITS.shape[0]):
        for k in set(UNITS[b]) - {-1}:
            in_rank = UNITS[b] == k
            expected[b, in_rank] = -adv[b, in_rank].mean() / mask.sum().item()
    np.testing.assert_allclose(logprobs.grad.numpy(), expected, atol=1e-12)


def test_off_policy_rank_ratio_is_geometric_mean_with_weight_one_over_rank_size():
    rng = np.random.default_rng(3)
    unit_ids = torch.tensor(UNITS)
    mask = UNITS >= 0
    new = -rng.random(UNITS.shape)
    old = new + rng.normal(scale=0.05, size=UNITS.shape)  # mu = 2: pi_old differs from pi_theta
    logprobs = torch.tensor(new, requires_grad=True)
    pooled = unit_mean((logprobs - torch.tensor(old)) * torch.tensor(mask), unit_ids, num_units=4)

    token_ratio = np.exp(new - old)
    expected = np.ones(UNITS.shape)
    for b in range(UNITS.shape[0]):
        for k in set(UNITS[b]) - {-1}:
            in_rank = UNITS[b] == k
            expected[b, in_rank] = np.prod(token_ratio[b, in_rank]) ** (1.0 / in_rank.sum())
    np.testing.assert_allclose(pooled.exp().detach().numpy()[mask], expected[mask], rtol=1e-12)
    assert (pooled.detach().numpy()[~mask] == 0).all()

    # Gradient of sum_t c_t * pooled_t: token s gets sum_{t in rank(s)} c_t / |rank(s)|.
    weights = rng.normal(size=UNITS.shape)
    (pooled * torch.tensor(weights)).sum().backward()
    expected_grad = np.zeros(UNITS.shape)
    for b in range(UNITS.shape[0]):
        for k in set(UNITS[b]) - {-1}:
            in_rank = UNITS[b] == k
            expected_grad[b, in_rank] = weights[b, in_rank].sum() / in_rank.sum()
    np.testing.assert_allclose(logprobs.grad.numpy(), expected_grad, atol=1e-12)


def test_off_policy_paper_loss_and_gradient_against_numpy():
    rng = np.random.default_rng(4)
    n, low, high = 3, 0.06, 0.08
    unit_ids = torch.tensor(UNITS)
    mask = UNITS >= 0
    new = -rng.random(UNITS.shape)
    old = new + rng.normal(scale=0.1, size=UNITS.shape)
    rank_adv = rng.normal(size=(UNITS.shape[0], n + 1))
    rank_adv[:, n] = -0.1  # overflow bin
    adv = np.where(mask, rank_adv[np.arange(3)[:, None], np.maximum(UNITS, 0)], 0.0)
    logprobs = torch.tensor(new, requires_grad=True)
    loss, _ = _rank_loss(logprobs, torch.tensor(old), torch.tensor(adv), torch.tensor(mask), unit_ids,
                         "seq_mean_unit_mean", n, low, high)
    loss.backward()

    # numpy: (1/(B N)) sum_i sum_k -min(w A, clip(w) A); d/d logp_t = (1/(B N)) * dl/dw * w / |k|.
    expected_loss, expected_grad = 0.0, np.zeros(UNITS.shape)
    clipped_any = False
    for b in range(UNITS.shape[0]):
        for k in set(UNITS[b]) - {-1}:
            in_rank = UNITS[b] == k
            w = np.exp((new[b, in_rank] - old[b, in_rank]).mean())
            a = rank_adv[b, k]
            unclipped, clipped = -w * a, -np.clip(w, 1 - low, 1 + high) * a
            expected_loss += max(unclipped, clipped)
            if unclipped >= clipped:
                expected_grad[b, in_rank] = -a * w / in_rank.sum()
            else:
                clipped_any = True
    expected_loss /= UNITS.shape[0] * n
    expected_grad /= UNITS.shape[0] * n
    assert clipped_any  # the test covers both branches
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-7)  # aggregate's 1/|k| weights are fp32
    np.testing.assert_allclose(logprobs.grad.numpy(), expected_grad, rtol=1e-7, atol=1e-12)


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------


def test_learner_smoke_with_sampled_rollout(tokenizer):
    torch.manual_seed(0)
    model = make_model(tokenizer, seed=3)
    prompt_ids, prompt_mask = left_padded_prompts(tokenizer, ["Recommend movies like Heat (1995).",
                                                              "Movies like Fargo (1996)?"])
    rollout = sample(model, prompt_ids, prompt_mask, group_size=4, config=SamplingConfig(max_new_tokens=24),
                     eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
    # A random tiny model almost never emits "\n": put newlines into the sampled rows (every 5th
    # token) and end row 0 with EOS at column 15, so several ranks and the overflow bin exist. The
    # learner recomputes the old log-probs itself for mu = 2, so the edited rows stay consistent.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    ids, mask, ended = rollout.completion_ids.clone(), rollout.completion_mask.clone(), rollout.ended_with_eos.clone()
    ids[:, 4::5] = torch.where(mask[:, 4::5], newline, ids[:, 4::5])
    ids[0, 15], ids[0, 16:], mask[0, 16:], ended[0] = tokenizer.eos_token_id, tokenizer.pad_token_id, False, True
    rollout = replace(rollout, completion_ids=ids, completion_mask=mask, ended_with_eos=ended)
    n = 3
    strategy = RankGRPO(tokenizer=tokenizer)
    rewards = Rewards.from_tensor(torch.rand(rollout.num_rows, n, generator=torch.Generator().manual_seed(1)))
    unit_ids = strategy.unit_ids(rollout, rewards)
    assert unit_ids.shape == rollout.completion_ids.shape
    assert set(unit_ids[rollout.completion_mask].tolist()) == {0, 1, 2, 3}
    assert int(unit_ids[0, 15]) == n  # the EOS after three newlines is in the overflow bin
    assert ((unit_ids >= 0) == rollout.completion_mask).all()
    advantages = strategy.advantages(rewards, rollout, unit_ids)
    assert advantages.shape == unit_ids.shape and torch.isfinite(advantages).all() and advantages.abs().sum() > 0

    before = [p.detach().clone() for p in model.parameters()]
    config = LearnerConfig(lr=1e-3, ppo_epochs=2, loss_agg_mode="seq_mean_unit_mean",
                           clip_ratio_low=0.06, clip_ratio_high=0.08, micro_batch_size=4)
    metrics = Learner(model, config, strategy).update(PolicyBatch(rollout, rewards, unit_ids, advantages, n))
    assert np.isfinite(metrics["loss"]) and metrics["skipped_optimizer_steps"] == 0
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
