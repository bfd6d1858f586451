"""Named experiments: one flat, typed config each, plus the overrides `--quick` applies.

Every key of `ExperimentConfig` can be changed from the command line with
`--set key=value`; loss keys use verl's names (`clip_ratio_low`, `clip_ratio_high`,
`loss_agg_mode`, `kl_loss_type`, `kl_coef`, `ppo_epochs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class ExperimentConfig:
    # --- what runs ---------------------------------------------------------
    name: str = ""
    kind: str = "rl"  # rl | sft | rl_pipeline (sft then rl) | baselines
    task: str = "sort"  # sort | recommendation
    algorithm: str = "grpo"  # a registered strategy (see algorithms/)
    # --- loop --------------------------------------------------------------
    seed: int = 0
    max_steps: int = 200
    save_every: int = 50
    eval_every: int = 50
    prompts_per_step: int = 8
    group_size: int = 8
    max_generation_rounds: int = 1  # > 1 only with dynamic sampling (DAPO)
    # --- sampling ----------------------------------------------------------
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int = 512
    rollout_dtype: str = "auto"  # sampler precision: auto (bf16 copy of fp32 weights on CUDA) | model | bfloat16 | float16 | float32
    # --- optimisation ------------------------------------------------------
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 32
    gradient_checkpointing: bool = False  # recompute decoder activations in backward: less memory, ~30% more time
    reference_offload: bool = False  # keep the KL reference model in CPU memory between updates
    # --- loss (verl names) -------------------------------------------------
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = None
    loss_agg_mode: str = "seq_mean_token_mean"
    loss_max_length: int | None = None
    kl_loss_type: str = "k3"
    kl_coef: float = 0.0
    advantage_scale: str = "group"
    advantage_eps: float = 1e-4
    # --- DAPO --------------------------------------------------------------
    overlong_max_length: int | None = None
    overlong_cache_length: int = 0
    # --- model -------------------------------------------------------------
    model: str | None = None  # local checkpoint or hub id; None = tiny model built from the dims below
    architecture: str = "qwen2"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 344
    vocab_size: int = 512
    device: str = "cpu"
    # --- sort task ---------------------------------------------------------
    sort_min_digits: int = 3
    sort_max_digits: int = 5
    sort_train_size: int = 5000
    sort_eval_size: int = 128
    # --- recommendation task -----------------------------------------------
    list_length: int = 10
    reward_kind: str = "exp_inf"  # exp_inf | exp_gamma | log_decay | ndcg (sequence reward)
    reward_gamma: float = 2.0
    length_shaping: bool = True
    eval_size: int = 0  # 0 = the whole test split
    sft_steps: int = 300
    sft_lr: float = 1e-3
    sft_batch_size: int = 32
    train_cut_points: int = 3


@dataclass
class Experiment:
    description: str
    config: ExperimentConfig
    quick: dict = field(default_factory=dict)


# Digit sorting: a tiny model is warm-started with 100 SFT steps (eval reward ~0.1: it
# has learnt the answer format, not yet sorting) and RL takes it from there.
SORT_DEFAULTS = dict(vocab_size=300, max_new_tokens=12, sft_steps=100, sft_lr=3e-3, lr=3e-4, max_steps=400,
                     save_every=100, eval_every=100)
SORT_QUICK = dict(max_steps=100, save_every=0, eval_every=0, sort_eval_size=64)


def _sort(name: str, algorithm: str, description: str, **overrides) -> Experiment:
    config = replace(ExperimentConfig(), name=name, task="sort", algorithm=algorithm, **{**SORT_DEFAULTS, **overrides})
    return Experiment(description, config, dict(SORT_QUICK))


EXPERIMENTS: dict[str, Experiment] = {
    "grpo_sort": _sort(
        "grpo_sort", "grpo", "GRPO (token unit) learns to sort digits from scratch; no recommendation code",
    ),
    "gspo_sort": _sort(
        "gspo_sort", "gspo", "GSPO (sequence unit) on digit sorting",
        # The paper's 3e-4 / 4e-4 clip assumes small off-policy drift per mini-batch; with
        # on-policy updates (ppo_epochs 1) the ratio is exactly 1 and the clip never acts.
        clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="seq_mean_token_mean",
    ),
    "dapo_sort": _sort(
        "dapo_sort", "dapo", "DAPO (clip-higher, token_mean, overlong shaping, dynamic sampling) on digit sorting",
        clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token_mean", kl_coef=0.0,
        overlong_max_length=12, overlong_cache_length=4, max_generation_rounds=3,
    ),
}


# Conversational recommendation (Rank-GRPO's setting). Reddit-v2 when present in the
# data dir, else the MovieLens-100K conversational set. Tiny Qwen2 (config C0 dims),
# tokenizer trained on the data, SFT warm start from an EASE teacher's lists (cached per
# config), then RL. Every RL variant shares the SFT checkpoint, the KL-to-SFT reference
# (k3, 1e-3), the clip range of the official Rank-GRPO code (0.06 / 0.08) and the
# token-mean aggregation, so the credit unit is the only difference between them.
REC_DEFAULTS = dict(
    task="recommendation", list_length=10, max_new_tokens=128, max_prompt_length=256, temperature=1.0,
    vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688,
    sft_steps=400, sft_lr=1e-3, sft_batch_size=32, lr=2e-5, max_steps=150, prompts_per_step=8, group_size=8,
    micro_batch_size=16, save_every=50, eval_every=50, clip_ratio_low=0.06, clip_ratio_high=0.08,
    kl_coef=1e-3, kl_loss_type="k3", loss_agg_mode="token_mean", eval_size=0,
)
REC_QUICK = dict(sft_steps=60, max_steps=8, eval_size=48, save_every=0, eval_every=0, hidden_size=128,
                 num_layers=2, intermediate_size=344, vocab_size=2048, prompts_per_step=2)


def _rec(name: str, kind: str, algorithm: str, description: str, **overrides) -> Experiment:
    config = replace(ExperimentConfig(), name=name, kind=kind, algorithm=algorithm, **{**REC_DEFAULTS, **overrides})
    return Experiment(description, config, dict(REC_QUICK))


EXPERIMENTS.update({
    "baselines_ml100k": Experiment(
        "popularity, item-kNN and EASE on the MovieLens-100K test split (Recall/NDCG @5/10/20)",
        replace(ExperimentConfig(), name="baselines_ml100k", kind="baselines", task="recommendation", list_length=20),
        {},
    ),
    "sft_reddit": _rec("sft_reddit", "sft", "grpo", "SFT warm start only (EASE-teacher demonstrations)"),
    "grpo_reddit": _rec("grpo_reddit", "rl", "grpo", "SFT + GRPO: token unit, sequence reward NDCG@N",
                        reward_kind="ndcg"),
    "gspo_reddit": _rec("gspo_reddit", "rl", "gspo", "SFT + GSPO: sequence unit, sequence reward NDCG@N",
                        reward_kind="ndcg", loss_agg_mode="seq_mean_token_mean",
                        clip_ratio_low=3e-4, clip_ratio_high=4e-4),
    "rank_grpo_reddit": _rec("rank_grpo_reddit", "rl", "rank_grpo",
                             "the headline: SFT + Rank-GRPO, rank unit, exp_inf per-rank reward",
                             reward_kind="exp_inf"),
    "rank_grpo_log_reddit": _rec("rank_grpo_log_reddit", "rl", "rank_grpo",
                                 "SFT + Rank-GRPO with the log_decay (causal DCG suffix) per-rank reward",
                                 reward_kind="log_decay"),
})


def experiment_names() -> list[str]:
    return sorted(EXPERIMENTS)
