"""The pipeline presets, as data.

Every stage config's own defaults (``SFTConfig``, ``RewardConfig``, ``PPOConfig``, ...) are the Llama 2 paper's
recipe for 7B/13B. A preset only says what differs, as ``"section.field": value`` overrides: the same keys that
``llama2-align run --set`` takes, applied by :func:`llama2_align.pipeline.resolve` through the same path, in this
order: stage defaults, then the preset, then the config file's and the command line's fields and overrides.
``llama2-align run --preset NAME --print-config`` prints the fully resolved result.
"""

from __future__ import annotations

from typing import Any

from .demo_dialogues import DEMO_CONSTRAINT_KINDS, DEMO_CONSTRAINT_VALUES

LORA = {"enabled": True, "r": 16, "alpha": 32}


def section(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{"lr": 1}`` under ``"sft"`` -> ``{"sft.lr": 1}``."""
    return {f"{name}.{key}": value for key, value in values.items()}


def both_reward_models(values: dict[str, Any]) -> dict[str, Any]:
    return {**section("reward_helpfulness", values), **section("reward_safety", values)}


# --- the demo world on a CPU: a tiny Llama 2 trained from scratch, every stage scaled down -----------------------

DEMO_SFT = {
    # 8 epochs: at 3 the tiny model answered ~10% of held-out helpful prompts at temperature 1, too weak a base for
    # the demo's "PPO keeps helpfulness" check to mean anything (measured: 0.37 at 8 epochs).
    "learning_rate": 3e-3, "weight_decay": 0.01, "epochs": 8, "batch_size": 32, "micro_batch_size": 32,
    "max_length": 128, "warmup_ratio": 0.05, "eval_steps": 50, "sample_max_new_tokens": 24,
}
DEMO_REWARD = {
    # 2 epochs (the paper: 1): a from-scratch tiny RM is still underfit after one.
    "learning_rate": 1e-3, "weight_decay": 0.0, "epochs": 2.0, "batch_size": 32, "micro_batch_size": 32,
    "max_length": 128, "eval_steps": 50, "score_batch_size": 128,
}
# 120 iterations at lr 6e-5 with beta 0.1 (was 30 at 3e-5, beta 0.02): measured per seed on the baby/legs world in
# bench/README.md ("Demo evidence"). With the reward/value heads seeded: 90 iterations gave +9.3 / +4.6 / +4.3
# points of helpfulness on seeds 0 / 1 / 2, 120 give +9.8 / +9.1 / +9.7 with the malformed rate not higher.
DEMO_PPO = {
    "iterations": 120, "prompts_per_iteration": 64, "mini_batch_size": 32, "micro_batch_size": 32, "ppo_epochs": 2,
    "learning_rate": 6e-5, "value_learning_rate": 1e-4, "weight_decay": 0.0, "kl_beta": 0.1, "max_new_tokens": 24,
    "sample_every": 10, "generation_batch_size": 64, "score_batch_size": 128,
}
DEMO_REJECTION_SAMPLING = {"max_new_tokens": 24, "generation_batch_size": 64, "score_batch_size": 128,
                           "num_samples": 4}
# Sampled at temperature 1 (greedy would hide the unsafe minority SFT learned), 16 samples per prompt: with 4, the
# same two checkpoints of seed 1 measured helpfulness +10.2 points, with 8 +3.9, with 16 +6.6 (bench/README.md): the
# answers drawn, not the checkpoints, decided the verdict. 16 cost ~25 s per run instead of ~5 s.
DEMO_EVAL = {"max_new_tokens": 24, "temperature": 1.0, "samples_per_prompt": 16, "batch_size": 128}
# After RLHF, when switched on (gatt.enabled, context_distillation.enabled). SFT's max_length 512 holds the 8-turn
# dialogues GAtt adds to the demo's SFT data (the single-turn records stay under 100 tokens: nothing else changes).
DEMO_POST_SFT = {"learning_rate": 3e-4, "weight_decay": 0.0, "epochs": 2, "batch_size": 32, "micro_batch_size": 32,
                 "max_length": 512, "warmup_ratio": 0.05, "eval_steps": 50, "save_steps": 50,
                 "sample_max_new_tokens": 24, "num_samples": 4, "progress_bar": False}
# The demo's instructions leave capital letters out and draw one value per kind (llama2_align/demo_dialogues.py says
# why). Each answer is sampled from its own turn (the dialogues' questions are independent; with the dialogue so far
# as context the tiny policy's sampled answers were right 52% of the time at turn 1 and 7% at turn 7, and GAtt taught
# that: helpfulness at turns 6-8 fell from 0.385 to 0.188), at temperature 0.5 (at 1.0 single-turn helpfulness fell
# 9.5 points against 0.7; 0.5 against 0.7: +2.0 [+0.6, +3.4] points, pooled over seeds 0-2, adherence unchanged),
# best of 4 (best of 8 obeyed more, 0.896 at turns 6-8 against 0.865, and cost 11 points of single-turn
# helpfulness), 768 dialogues then (384: adherence at turns 6-8 0.823), one pass (two: bench/README.md). Seed 0, runs
# gc8-gc16; seeds 0-2, runs ge0-ge2 and gt0-gt2; README "After RLHF". GAtt and the multi-turn evaluation give an
# answer 32 new tokens, not the single-turn 24: an instruction lengthens the longest good answer of the world to 31-32
# tokens ("Great, good question! ... Have a nice day!"); at 24 GAtt dropped 287 cut-off turns of 3,430 on seed 0 and
# the evaluation counted cut sign-offs as disobeyed (runs gy0-gy2; tests/unit/test_gatt.py checks the fit).
# It trains one example per dialogue (train_on="dialogue": the same answers and per-token losses as one example per
# turn, a third of the tokens) on 1536 dialogues, 10 a batch: against 768 one-example-per-turn dialogues, 32 a batch,
# late helpfulness +5.2 / +5.2 / +1.7 points and seed 1's adherence +4.9 points, violations +1.1 points pooled
# (runs gz0-gz2 against gy0-gy2; bench/README.md "Ghost Attention's token budget"). Its batches group dialogues of
# similar length (gatt.sft.group_by_length; otherwise a batch of 10 dialogues of 1 to 8 turns is padded to its
# longest): the fine-tune took 60 / 41 / 44 s instead of 79 / 75 / 71 s on seeds 0-2, adherence and helpfulness
# unchanged within their intervals (runs t0g-t2g against s0, t1, s2; bench/README.md "Ghost Attention's batches by
# length"). Before it samples, it fine-tunes the policy on 1,000 of the world's instruction demonstrations (the
# warm-up, gatt.demonstrations; demo_dialogues.instruction_demonstrations): 60% where the word to avoid changes the
# answer, 20% refusals of adversarial prompts and 20% borderline prompts answered, all worded to obey. The tiny policy
# obeyed "avoid is" on those prompts 5 of 13 times at turn 1, and GAtt could not carry what it did not do; warmed up,
# adherence at turns 6-8 0.983 / 0.958 / 0.969 (seeds 0-2; 0.875 / 0.812 / 0.910 before). Without the refusals the
# warm-up raised violations over the distilled policy by 5.0 / 1.7 / 6.5 points; with refusals alone the policy
# refused borderline prompts under an instruction (bench/README.md "Ghost Attention's warm-up").
DEMO_GATT = {"dialogues": 1536, "train_on": "dialogue", "max_new_tokens": 32, "generation_batch_size": 128,
             "constraint_kinds": list(DEMO_CONSTRAINT_KINDS), "constraint_values": DEMO_CONSTRAINT_VALUES,
             "sample_context": "turn", "temperature": 0.5, "samples_per_turn": 4, "require_obeyed": True,
             "score_batch_size": 128, "demonstrations": 1000}
# Context distillation samples at temperature 0.7 (at 1.0 the targeted variant's violation rate did not fall on seed 0,
# +0.003 [-0.007, +0.014]; at 0.7 it fell on seeds 1 and 2; bench/README.md "Context distillation's sampling").
# The demo also distils on the helpful prompts and fine-tunes 4 epochs (not 2): 4 epochs on the red-team prompts alone
# lowered violations on seed 0 (-0.011 [-0.019, -0.003]) and cost 4.5 points of helpfulness; with the helpful prompts
# beside them (the safety RM keeps no refusal there) violations fell on seeds 0, 1 and 2 and helpfulness rose.
DEMO_CONTEXT_DISTILLATION = {"samples_per_prompt": 2, "temperature": 0.7, "max_new_tokens": 24,
                             "categories": ["adversarial", "borderline", "helpful"],
                             "generation_batch_size": 128, "score_batch_size": 128}
DEMO_ADHERENCE = {"dialogues": 96, "turns": 8, "max_new_tokens": 32, "batch_size": 128, "score_batch_size": 128,
                  "constraint_kinds": list(DEMO_CONSTRAINT_KINDS), "constraint_values": DEMO_CONSTRAINT_VALUES}

DEMO = {
    **section("sft", DEMO_SFT),
    **both_reward_models(DEMO_REWARD),
    # the helpfulness RM: 6 epochs at lr 5e-4 (2 at 1e-3 reached ~80% on significantly-better pairs; 6 reach 89-91%),
    # with a quarter as many safety pairs as helpfulness pairs (the paper: as many). With as many, the safety pairs
    # (refusal over compliance) outvote the helpfulness annotators' mild preference for compliance on adversarial
    # prompts: 8-11% on those negligibly-better pairs, 40-48% on all of them (below chance). With a quarter (seeds
    # 0-2, bench/README.md): 46-58% on negligibly-better and 83-91% on significantly-better pairs. PPO scores
    # adversarial prompts with the safety RM (Llama 2's reward switch), so the helpfulness RM's view of them does not
    # steer it there.
    "reward_helpfulness.epochs": 6.0, "reward_helpfulness.learning_rate": 5e-4,
    "reward_helpfulness.safety_pairs_per_helpfulness_pair": 0.25,
    **section("rejection_sampling", DEMO_REJECTION_SAMPLING),
    **section("rejection_sampling.sft", DEMO_SFT),
    **section("ppo", DEMO_PPO),
    **section("eval", DEMO_EVAL),
    "sft.max_length": 512,
    **section("gatt", DEMO_GATT),
    **section("gatt.sft", {**DEMO_POST_SFT, "batch_size": 10, "micro_batch_size": 10, "group_by_length": True}),
    **section("context_distillation", DEMO_CONTEXT_DISTILLATION),
    **section("context_distillation.sft", {**DEMO_POST_SFT, "epochs": 4}),
    **section("adherence", DEMO_ADHERENCE),
}

# --- real Llama 2 checkpoints on GPUs --------------------------------------------------------------------------------

GPU = {
    "sft.gradient_checkpointing": True,
    **both_reward_models({"micro_batch_size": 4, "gradient_checkpointing": True}),
    "ppo.gradient_checkpointing": True,
    **section("rejection_sampling", {"k": 16, "temperature": 1.2, "max_new_tokens": 512, "generation_batch_size": 32,
                                     "score_batch_size": 32}),
    "rejection_sampling.sft.gradient_checkpointing": True,
}
WITH_LORA = {key: LORA for key in ("sft.lora", "reward_helpfulness.lora", "reward_safety.lora", "ppo.lora",
                                   "rejection_sampling.sft.lora")}
# 70B: micro-batch 1, the paper's RM learning rate for 70B and its smaller KL penalty. The memory plan
# (`llama2-align plan`): even on 8 x 80 GiB, PPO's five 70B roles fit only with the policy's and the value model's
# bases in 4 bits (QLoRA); the reward models stay bf16.
LLAMA2_70B = {
    "sft.micro_batch_size": 1, "rejection_sampling.sft.micro_batch_size": 1,
    **both_reward_models({"micro_batch_size": 1, "learning_rate": 5e-6}),
    "ppo.kl_beta": 0.005,
}
QLORA_PPO = {"ppo.lora": {**LORA, "quantize": "nf4"}}

PRESETS: dict[str, dict[str, Any]] = {
    "demo-tiny": {
        "base_model": "tiny",
        **DEMO,
        "sft.progress_bar": False, **both_reward_models({"progress_bar": False}),
    },
    "demo-micro": {  # seconds, for tests
        "base_model": "micro",
        "data.demo_sizes": "micro", "data.vocab_size": 400,
        **DEMO,
        **section("sft", {"max_steps": 30, "eval_steps": 10, "save_steps": 10, "logging_steps": 5, "num_samples": 3,
                          "progress_bar": False}),
        **both_reward_models({"max_steps": 8, "eval_steps": 4, "save_steps": 4, "logging_steps": 2,
                              "progress_bar": False}),
        **section("ppo", {"iterations": 3, "prompts_per_iteration": 16, "mini_batch_size": 16,
                          "micro_batch_size": 16, "max_new_tokens": 12, "save_every": 2, "sample_every": 1,
                          "num_samples": 3}),
        **section("eval", {"max_new_tokens": 12, "samples_per_prompt": 1, "max_prompts": 30}),
        # the micro model rarely ends an answer with EOS: keep what it writes
        **section("gatt", {"dialogues": 16, "max_turns": 3, "max_new_tokens": 12, "require_finished": False,
                           "require_obeyed": False, "samples_per_turn": 2}),
        **section("context_distillation", {"samples_per_prompt": 1, "max_prompts": 16, "max_new_tokens": 12,
                                           "require_finished": False}),
        **{f"{s}.sft.{k}": v for s in ("gatt", "context_distillation")
           for k, v in {"max_steps": 2, "eval_steps": 10, "save_steps": 10, "logging_steps": 1, "num_samples": 1,
                        "batch_size": 8, "micro_batch_size": 8}.items()},
        **section("adherence", {"dialogues": 6, "turns": 3, "late_turn": 2, "max_new_tokens": 12}),
    },
    "llama2-7b-lora": {"base_model": "/models/llama2-7b-hf", **GPU, **WITH_LORA},
    "llama2-7b": {"base_model": "/models/llama2-7b-hf", **GPU},
    "llama2-13b-lora": {"base_model": "/models/llama2-13b-hf", **GPU, **WITH_LORA},
    "llama2-70b-lora": {"base_model": "/models/llama2-70b-hf", **GPU, **WITH_LORA, **LLAMA2_70B, **QLORA_PPO},
}
