"""The GR2 task (experiments/gr2_task.py) on a hand-made catalogue: rewards, constrained decoding, teacher
traces, evaluation metrics, the paired bootstrap and bad input."""

import math

import numpy as np
import pytest
import torch

from engine.rollout import SamplingConfig, sample
from engine.tokens import decode_completions, encode_prompts
from experiments.data.movielens import Movie
from experiments.gr2_task import (
    GR2Task,
    GR2TaskConfig,
    RankingConstraint,
    RerankRequest,
    rank_metrics,
)
from experiments.statistics import paired_bootstrap
from fastdecode import fast_decoder
from models.semantic_ids import SemanticIds
from models.tiny import train_tokenizer
from rewards.gr2 import RANKING_MARKER, format_ranking, parse_ranking
from tests.conftest import make_model, recompute_gaps

GENRES = ("Drama", "Comedy", "Action", "Horror")
NUM_ITEMS = 16


def toy_task(**settings) -> GR2Task:
    """16 films; item i has SID (i // 8, (i // 2) % 4, i % 2): unique, with shared prefixes.
    Train request 0 has x* = item 4 at pre-rank 4, request 1 x* = item 1 at pre-rank 1."""
    movies = {i: Movie(i, f"Film {i}", 1980 + i, f"Film {i} ({1980 + i})", (GENRES[i % 4], GENRES[(i + 1) % 4]))
              for i in range(NUM_ITEMS)}
    codes = [[i // 8, (i // 2) % 4, i % 2] for i in range(NUM_ITEMS)]
    semantic_ids = SemanticIds(list(range(NUM_ITEMS)), np.array(codes), [2, 4, 2])
    candidates = tuple(range(1, 11))
    scores = tuple(float(10 - k) for k in range(10))
    train = [RerankRequest(7, (12, 13), candidates, scores, 4), RerankRequest(8, (14,), candidates, scores, 1)]
    evaluation = [RerankRequest(9, (15, 12), candidates, scores, 3), RerankRequest(10, (11,), candidates, scores, 9)]
    return GR2Task(GR2TaskConfig(**settings), semantic_ids, movies, {"train": train, "val": evaluation,
                                                                     "test": evaluation}, [((12, 13), 4)], seed=0)


def moved(task, request, pre_rank, new_rank):
    """The completion that moves the item at 1-based `pre_rank` to `new_rank`, others in input order."""
    sids = task.candidate_sids(request)
    item = sids.pop(pre_rank - 1)
    sids.insert(new_rank - 1, item)
    return format_ranking("Because.", sids)


# --------------------------------------------------------------------------- rewards


# (request, pre -> re, conditional R, unconditional R) with |D| = 10, alpha = 0.1, hand-computed
REWARD_CASES = [
    (0, 4, 1, 0.4, 0.4),     # promotion: R_rank = 0.3, + alpha
    (0, 4, 4, 0.0, 0.1),     # copy of the input order: conditional pays nothing, unconditional pays alpha
    (0, 4, 7, -0.3, -0.2),   # demotion
    (1, 1, 1, 0.1, 0.1),     # x* already first and kept (a copy too)
    (1, 1, 3, -0.1, -0.1),   # x* first then demoted: the literal condition still grants alpha
]


@pytest.mark.parametrize("conditional", [True, False])
def test_task_rewards_conditional_and_unconditional(conditional):
    task = toy_task(conditional_reward=conditional)
    texts = [moved(task, task.train[request], pre, new) for request, pre, new, _, _ in REWARD_CASES]
    texts.append("Because.\nno ranking here")  # unparseable: -1 under both
    indices = [case[0] for case in REWARD_CASES] + [0]
    expected = [case[3] if conditional else case[4] for case in REWARD_CASES] + [-1.0]
    torch.testing.assert_close(task.rewards(indices, texts), torch.tensor(expected), atol=1e-6, rtol=0)
    (logged,) = task.reward_log
    assert logged["copy_frac"] == pytest.approx(2 / 6)  # 4 -> 4 and 1 -> 1 copy the input order
    assert logged["parse_frac"] == pytest.approx(5 / 6)
    assert logged["promote_frac"] == pytest.approx(1 / 6)
    assert logged["kept_frac"] == pytest.approx(2 / 6)  # the two copies keep x* where it was
    # concordant pairs of the 5 parsed rankings: moving one item by k places breaks k of the 45 pairs
    assert logged["order_agreement"] == pytest.approx(np.mean([1 - 3 / 45, 1.0, 1 - 3 / 45, 1.0, 1 - 2 / 45]))
    assert logged["prompts"] == 2
    assert task.state_dict()["reward_log"] == [logged]


# --------------------------------------------------------------------------- constrained decoding


@pytest.fixture(scope="module")
def policy():
    task = toy_task()
    tokenizer = train_tokenizer(task.corpus() * 4, vocab_size=300)
    model = make_model(tokenizer, seed=3)
    task.prepare_policy(model, tokenizer)
    task.prepare_policy(model, tokenizer)  # idempotent
    task.bind(model, tokenizer)
    return task, tokenizer, model


def reference_allowed(prefix, candidates, marker, newline, eos, ends_line, vocab_size, allow_repeats=False):
    """The allowed next tokens after `prefix`, walked token by token (the rules of the module docstring)."""
    if marker not in prefix:
        allowed = set(range(vocab_size))
        if prefix and prefix[-1] not in ends_line:
            allowed.discard(marker)
        return allowed
    rest = prefix[prefix.index(marker) + 1:]
    if not rest:
        return {newline}
    rest, used, levels = rest[1:], [], len(candidates[0])
    while True:
        if len(used) == len(candidates):
            return {eos}
        line = rest[:levels]
        if len(line) < levels:  # inside a line: the next level of an unused candidate with this prefix
            return {c[len(line)] for c in candidates if (allow_repeats or c not in used) and c[: len(line)] == line}
        used.append(line)
        rest = rest[levels:]
        if not rest:
            return {newline} if len(used) < len(candidates) else {eos}
        rest = rest[1:]


def sample_under(hook, policy, seed):
    """6 samples for each of the two training prompts under `hook`, the marker pushed up so that the random
    model reaches the ranked part: (the hook as the sampler used it, rollout, texts)."""
    task, tokenizer, model = policy
    marker = tokenizer.get_vocab()[RANKING_MARKER]

    def biased(logits, prompt_indices, completion_ids, start):
        return hook(logits + 6.0 * (torch.arange(logits.shape[-1]) == marker), prompt_indices, completion_ids, start)

    ids, mask = encode_prompts(tokenizer, [task.train_messages(0), task.train_messages(1)], 512, torch.device("cpu"))
    rollout = sample(model, ids, mask, 6, SamplingConfig(max_new_tokens=48), [tokenizer.eos_token_id],
                     tokenizer.pad_token_id, torch.Generator().manual_seed(seed), logits_hook=biased,
                     prompt_indices=torch.tensor([0, 1]), make_decoder=fast_decoder)
    texts = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask, rollout.ended_with_eos)
    return biased, rollout, texts


def test_constrained_decoding_candidates_once_and_recompute_matches(policy):
    task, tokenizer, model = policy
    hook = task.logits_hook
    marker = tokenizer.get_vocab()[RANKING_MARKER]
    biased, rollout, texts = sample_under(hook, policy, seed=0)
    vocab = tokenizer.get_vocab()
    sid_token_ids = {vocab[token] for token in task.semantic_ids.vocabulary()}
    ranked_rows = 0
    for row, text in enumerate(texts):
        tokens = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
        request = task.train[int(rollout.prompt_indices[row])]
        if marker not in tokens:
            continue
        ranked_rows += 1
        after = tokens[tokens.index(marker) + 1:]
        assert all(t in sid_token_ids or tokenizer.decode([t]) == "\n" or t == tokenizer.eos_token_id for t in after)
        lines = tokenizer.decode(after, skip_special_tokens=True).split("\n")[1:]
        written = lines if rollout.ended_with_eos[row] else lines[:-1]  # the last line of a cut row may be partial
        assert set(written) <= set(task.candidate_sids(request)) and len(set(written)) == len(written)  # once each
        if rollout.ended_with_eos[row]:
            ranked_rows += 1
            assert sorted(written) == sorted(task.candidate_sids(request))
            assert parse_ranking(text, task.candidate_sids(request)) is not None
    assert ranked_rows >= 4

    # every position's allowed set equals the token-by-token reference, computed in one call and in chunks
    candidates = task.hooks["train"].candidates.tolist()
    ends_line = set(task.hooks["train"].ends_line.nonzero().squeeze(1).tolist())
    vocab_size = len(tokenizer)
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    zeros = torch.zeros(rollout.num_rows, rollout.completion_ids.shape[1], vocab_size)
    whole = hook(zeros, rollout.prompt_indices, rollout.completion_ids, 0)
    chunks = torch.cat([hook(zeros[:, s:s + 5], rollout.prompt_indices, rollout.completion_ids, s)
                        for s in range(0, zeros.shape[1], 5)], dim=1)
    assert torch.equal(whole, chunks)
    for row in range(rollout.num_rows):
        tokens = rollout.completion_ids[row].tolist()
        for t in range(int(rollout.completion_lengths[row])):
            expected = reference_allowed(tokens[:t], candidates[int(rollout.prompt_indices[row])], marker, newline,
                                         tokenizer.eos_token_id, ends_line, vocab_size)
            assert set(torch.isfinite(whole[row, t]).nonzero().squeeze(1).tolist()) == expected, (row, t)

    # the learner's recompute under the same constraint gives the sampler's log-probs
    assert recompute_gaps(model, rollout, chunk_size=7, logits_hook=biased)[0] < 1e-5


def test_constraint_with_repeats_allowed_names_candidates_and_a_repeat_breaks_the_format(policy):
    task, tokenizer, model = policy
    requests = task.train
    hook = RankingConstraint.build(tokenizer, [task.candidate_sids(r) for r in requests], 10, allow_repeats=True)
    marker = tokenizer.get_vocab()[RANKING_MARKER]
    biased, rollout, texts = sample_under(hook, policy, seed=1)
    finished_lists, repeats = 0, 0
    for row, text in enumerate(texts):
        tokens = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
        if marker not in tokens or not rollout.ended_with_eos[row]:
            continue
        sids = task.candidate_sids(requests[int(rollout.prompt_indices[row])])
        written = tokenizer.decode(tokens[tokens.index(marker) + 1:], skip_special_tokens=True).split("\n")[1:]
        assert len(written) == 10 and set(written) <= set(sids)  # ten lines, each a real candidate
        finished_lists += 1
        has_repeat = len(set(written)) < 10
        repeats += has_repeat
        assert (parse_ranking(text, sids) is None) == has_repeat  # a repeat is a broken format
    assert finished_lists >= 3 and repeats >= 1  # a random policy repeats a candidate among 10 lines

    candidates = hook.candidates.tolist()
    ends_line = set(hook.ends_line.nonzero().squeeze(1).tolist())
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    allowed = hook(torch.zeros(rollout.num_rows, rollout.completion_ids.shape[1], len(tokenizer)),
                   rollout.prompt_indices, rollout.completion_ids, 0)
    for row in range(rollout.num_rows):
        tokens = rollout.completion_ids[row].tolist()
        for t in range(int(rollout.completion_lengths[row])):
            expected = reference_allowed(tokens[:t], candidates[int(rollout.prompt_indices[row])], marker, newline,
                                         tokenizer.eos_token_id, ends_line, len(tokenizer), allow_repeats=True)
            assert set(torch.isfinite(allowed[row, t]).nonzero().squeeze(1).tolist()) == expected, (row, t)
    assert recompute_gaps(model, rollout, chunk_size=7, logits_hook=biased)[0] < 1e-5


def test_repeats_allowed_binds_that_constraint_and_needs_constrained_decoding(policy):
    _, tokenizer, model = policy
    task = toy_task(allow_repeated_candidates=True)
    task.bind(model, tokenizer)
    assert task.logits_hook.allow_repeats and all(hook.allow_repeats for hook in task.hooks.values())
    with pytest.raises(ValueError, match="allow_repeated_candidates.*constrained_decoding = true"):
        GR2TaskConfig(allow_repeated_candidates=True, constrained_decoding=False)


def test_unconstrained_decoding_binds_no_hook(policy):
    _, tokenizer, model = policy
    task = toy_task(constrained_decoding=False)
    task.bind(model, tokenizer)
    assert task.logits_hook is None and task.hooks == {}


def test_marker_only_at_the_start_of_a_line(policy):
    task, tokenizer, _ = policy
    marker = tokenizer.get_vocab()[RANKING_MARKER]
    word = tokenizer("Film", add_special_tokens=False)["input_ids"]
    newline = tokenizer("Film\n", add_special_tokens=False)["input_ids"]
    for prefix, allowed in (([], True), (word, False), (newline, True)):
        ids = torch.tensor([prefix + [tokenizer.pad_token_id]])  # the sampler's layout: the next column is pad
        logits = task.logits_hook(torch.zeros(1, 1, len(tokenizer)), torch.tensor([0]), ids, len(prefix))
        assert bool(torch.isfinite(logits[0, 0, marker])) == allowed


# --------------------------------------------------------------------------- bad input


def test_bad_candidate_lists_and_missing_tokens(policy):
    task, tokenizer, _ = policy
    sids = task.candidate_sids(task.train[0])
    with pytest.raises(ValueError, match="has 9 candidates; GR2 reranks exactly"):
        RankingConstraint.build(tokenizer, [sids[:9]], 10)
    with pytest.raises(ValueError, match="more than once"):
        RankingConstraint.build(tokenizer, [[sids[0]] + sids[:9]], 10)
    with pytest.raises(ValueError, match="'<a_7>', which the tokenizer lacks"):
        RankingConstraint.build(tokenizer, [sids[:9] + ["<a_7><b_0><c_0>"]], 10)
    with pytest.raises(ValueError, match="prepare_policy"):
        RankingConstraint.build(train_tokenizer(["a few words"] * 4, vocab_size=280), [sids], 10)
    with pytest.raises(ValueError, match="prompt indices"):
        task.logits_hook(torch.zeros(1, 1, len(tokenizer)), torch.tensor([-1]), torch.zeros(1, 1, dtype=torch.long), 0)
    short = toy_task()
    request = short.train[0]
    for candidates, message in ((request.candidate_item_ids[:9], "has 9 candidates"),
                                (request.candidate_item_ids[:9] + (4,), "more than once")):
        with pytest.raises(ValueError, match=message):
            GR2Task(short.config, short.semantic_ids, short.movies,
                    {"train": [RerankRequest(1, (2,), candidates, request.candidate_scores, 4)],
                     "val": short.splits["val"], "test": short.splits["test"]}, [])


def test_config_checks():
    with pytest.raises(ValueError, match="trace_variant"):
        GR2TaskConfig(trace_variant="oracle")
    with pytest.raises(ValueError, match="unparseable_reward"):
        GR2TaskConfig(unparseable_reward=0.1)  # a broken format would pay


# --------------------------------------------------------------------------- teacher traces


def test_teacher_traces_put_the_target_first():
    targeted = toy_task(trace_variant="targeted")
    for index, request in enumerate(targeted.train):
        ranking = parse_ranking(targeted.teacher_trace(index), targeted.candidate_sids(request))
        assert ranking is not None and ranking[0] == targeted.semantic_ids.sid_of(request.target_item_id)
    # near-zero temperature: the teacher draws its argmax order; item 1 has the best pre-ranker score and the
    # genre affinity decides nothing against it, so rejection keeps request 1 (x* = 1) and drops request 0
    rejection = toy_task(trace_variant="rejection", teacher_temperature=1e-4, teacher_genre_weight=0.0)
    assert rejection.teacher_trace(0) is None
    trace = rejection.teacher_trace(1)
    assert parse_ranking(trace, rejection.candidate_sids(rejection.train[1])) == rejection.candidate_sids(
        rejection.train[1])
    assert trace.startswith("Liked genres: Action, Horror. Top pick <a_0><b_0><c_1>: shares Action.")


def test_teacher_logits_formula():
    task = toy_task(teacher_genre_weight=2.0, teacher_temperature=0.5)
    request = task.train[0]  # history items 12 (Drama, Comedy), 13 (Comedy, Action)
    scores = np.arange(10, 0, -1, dtype=float)
    z = (scores - scores.mean()) / scores.std()
    genres = [{GENRES[i % 4], GENRES[(i + 1) % 4]} for i in range(1, 11)]
    affinity = np.array([np.mean([bool(g & {"Drama", "Comedy"}), bool(g & {"Comedy", "Action"})]) for g in genres])
    np.testing.assert_allclose(task.teacher_logits(request), (z + 2.0 * affinity) / 0.5, atol=1e-6)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_metrics_against_hand_values():
    task = toy_task()
    requests = task.splits["test"]  # x* at pre-rank 3 and 9

    def generate(chats, prompt_indices=None, logits_hook=None):
        assert prompt_indices == [0, 1] and logits_hook is None  # not bound: unconstrained
        return [moved(task, requests[0], 3, 1), format_ranking("copy", task.candidate_sids(requests[1]))]

    metrics = task.evaluate(generate, "test")
    # reranked ranks 1 and 9; pre-ranks 3 and 9
    assert metrics["recall@1"] == 0.5 and metrics["recall@5"] == 0.5 and metrics["ndcg@5"] == pytest.approx(0.5)
    assert metrics["pre_rank/recall@1"] == 0.0 and metrics["pre_rank/recall@5"] == 0.5
    assert metrics["pre_rank/ndcg@5"] == pytest.approx(0.5 / math.log2(4))
    assert metrics["parse_frac"] == 1.0 and metrics["copy_frac"] == 0.5 and metrics["kept_frac"] == 0.5
    assert metrics["order_agreement"] == pytest.approx((1 - 2 / 45 + 1.0) / 2)  # item 3 moved up 2 places
    garbage = task.evaluate(lambda chats, prompt_indices=None, logits_hook=None: ["no"] * len(chats), "val")
    assert garbage["recall@5"] == 0.0 and garbage["parse_frac"] == 0.0  # unparseable = a miss


def test_rank_metrics_and_paired_bootstrap():
    metrics = rank_metrics(np.array([1, 2, 5, 6, 0]))
    np.testing.assert_allclose(metrics["recall@1"], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(metrics["recall@5"], [1, 1, 1, 0, 0])
    np.testing.assert_allclose(metrics["ndcg@5"], [1, 1 / math.log2(3), 1 / math.log2(6), 0, 0])
    assert paired_bootstrap(np.full(20, 0.5), np.full(20, 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    rng = np.random.default_rng(1)
    differences = rng.normal(0.1, 1.0, size=2000)
    mean, low, high = paired_bootstrap(differences, np.zeros(2000), resamples=4000)
    half_width = 1.96 * differences.std(ddof=1) / math.sqrt(differences.size)  # normal approximation
    assert mean == pytest.approx(differences.mean())
    assert low == pytest.approx(mean - half_width, abs=0.2 * half_width)
    assert high == pytest.approx(mean + half_width, abs=0.2 * half_width)
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap(np.array([]), np.array([]))


def test_warm_start_stages_are_cached_locked_and_written_whole(tmp_path, monkeypatch, tokenizer):
    from experiments.warm_start import cached_stage, hold_lock, stage_folder

    monkeypatch.setenv("RECRL_CACHE_DIR", str(tmp_path))
    model = make_model(tokenizer, seed=0)
    calls = []

    def train():  # stands in for supervised_finetune: changes the weights in place
        calls.append(1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.5)
        return [{"step": 1, "sft_loss": 1.0}]

    stale = stage_folder("gr2-stage1", {"a": 1}).with_name(f"{stage_folder('gr2-stage1', {'a': 1}).name}.tmp-4242")
    stale.mkdir(parents=True)  # left by a killed run
    assert cached_stage(model, "gr2-stage1", {"a": 1}, train) == [{"step": 1, "sft_loss": 1.0}]
    assert not stale.exists()
    trained = [parameter.detach().clone() for parameter in model.parameters()]
    fresh = make_model(tokenizer, seed=0)
    assert cached_stage(fresh, "gr2-stage1", {"a": 1}, lambda: pytest.fail("the cached stage ran again"))[0]["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(trained, fresh.parameters()))
    cached_stage(make_model(tokenizer, seed=0), "gr2-stage1", {"a": 2}, train)  # another identity: trained again
    assert len(calls) == 2
    finished = stage_folder("gr2-stage1", {"a": 1})
    with hold_lock(finished.with_name(f"{finished.name}.lock"), "test"):  # another run holds a finished entry:
        cached_stage(make_model(tokenizer, seed=0), "gr2-stage1", {"a": 1}, train)  # read without the lock
    folder = stage_folder("gr2-stage1", {"a": 3})
    with hold_lock(folder.with_name(f"{folder.name}.lock"), "test"):  # another run trains this entry
        with pytest.raises(Exception, match="is in use by pid"):
            cached_stage(make_model(tokenizer, seed=0), "gr2-stage1", {"a": 3}, train)
    assert len(calls) == 2 and not folder.exists()


def test_run_selection_of_a_finished_and_a_stopped_run(tmp_path):
    import json

    from experiments.gr2_task import run_selection

    rows = [{"step": 0, "eval": True, "split": "val", "eval/ndcg@5": 0.3},
            {"step": 0, "eval": True, "split": "test", "eval/ndcg@5": 0.9},  # test rows never choose
            {"step": 5, "loss": 1.0},
            {"step": 20, "eval": True, "split": "val", "eval/ndcg@5": 0.5},
            {"step": 40, "eval": True, "split": "val", "eval/ndcg@5": 0.5}]  # a tie keeps the first best
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "eval.json").write_text(json.dumps({"sft": {"ndcg@5": 0.3}}))  # stopped: no RL stage yet
    assert run_selection(tmp_path) == {"metric": "ndcg@5", "best_step": 20, "best_value": 0.5,
                                       "history": [[0, 0.3], [20, 0.5], [40, 0.5]], "stopped_early": True}
    finished = {"metric": "ndcg@5", "split": "val", "best_step": 40, "best_value": 0.6, "history": [[40, 0.6]]}
    (tmp_path / "selection.json").write_text(json.dumps(finished))
    assert run_selection(tmp_path) == {key: finished[key] for key in ("metric", "best_step", "best_value", "history")}
