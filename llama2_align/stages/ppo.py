"""PPO against the two reward models, as in Llama 2-Chat (§3.2.3): a loop you can read in one screen.

The loop (:func:`run_ppo`) is flat; each phase is a function below it with the paper it follows:

    for each iteration:
        rollout     sample responses for this rank's share of the prompts (KV cache, temperature, top-p, EOS stop)
        score       log-probs of the policy and the frozen reference, values, both reward models, and the reward:
                    ``whiten(logit(Rc))`` on the last token (Rc: the safety-gated piecewise reward), a per-token KL
                    penalty ``-β·(log π - log π0)``, a fixed penalty for a response that hit the length limit
        advantages  GAE (γ 1, λ 0.95), whitened over the global batch
        optimise    PPO epochs of clipped policy and value updates over mini-batches, gradients averaged over ranks
        log         global metrics, sample rows, progress
        checkpoint  every ``save_every`` iterations: policy, value, optimizers (DCP), RNG and prompt order (no pickle)

Roles: the policy (SFT checkpoint, full or LoRA), the reference (the SFT policy; with LoRA the same weights with
adapters disabled), a value model initialised from a reward model, the two frozen reward models. Under torchrun
every rank rolls out its own share of the prompts; rank 0 writes. With ``sharding: fsdp`` every model is sharded
over the ranks with FSDP2 (``llama2_align.fsdp``: the policy's base once, shared with the reference; the value
model; both reward models), set up in :func:`shard_roles`; the loop is the same. Every piece of the reward switches
off in config, for the paper's ablations. The maths is ``ppo_core`` (pure functions, unit-tested); names follow
cleanrl: ``b_`` for the iteration's batch, ``mb_`` for a mini-batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import dist
from ..chat import encode_prompt
from ..data import PromptRecord, read_records
from ..device import no_grad, resolve_dtype
from ..errors import ConfigError
from ..dist import LaunchSettings
from ..io import append_jsonl, atomic_write_json, read_jsonl
from ..lora import LoraSettings
from ..tokenizer import load_tokenizer
from .common import (FINAL_DIR, METRICS_FILE, STAGING_DIR, StageOutput, StageRun, Timer, checkpoint_step,
                     prune_checkpoints, stage)
from .reward import RewardScorer

if TYPE_CHECKING:
    import torch

    from ..model import Reference

VALUE_DIR = "value"
MODELS_DIR = "models"  # a checkpoint's DCP directory: policy and value (trainable tensors) and their optimizers


class NonFiniteError(RuntimeError):
    """A NaN or inf appeared; the stage stops instead of training on."""


class PPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(200, ge=1)
    prompts_per_iteration: int = Field(512, ge=1, description="rollouts per iteration, all ranks together")
    mini_batch_size: int = Field(64, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="gradient accumulation inside a mini-batch")
    ppo_epochs: int = Field(1, ge=1)
    learning_rate: float = Field(1e-6, gt=0)
    value_learning_rate: float = Field(1e-5, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-5
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    clip_range: float = 0.2
    value_clip_range: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # reward
    kl_penalty: bool = True
    kl_beta: float = Field(0.01, ge=0, description="0.01 for 7B/13B, 0.005 for 34B/70B (paper)")
    piecewise_reward: bool = True
    safety_threshold: float = 0.15
    use_logit: bool = True
    whiten_rewards: bool = True
    missing_eos_penalty: float | None = Field(-1.0, description="added to the score of a response without EOS")
    target_kl: float | None = Field(None, description="stop an iteration's epochs early past this approx KL")
    # rollout
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    rollout_logprobs: bool | None = Field(
        None, description="take the old policy's log-probs from the rollout (recorded while sampling) instead of a "
                          "second forward pass over the batch; None = when the policy is float32 (in bf16/fp16 the "
                          "cached decode and a full forward round differently, so the first epoch's ratio would not "
                          "start at exactly 1)")
    generation_batch_size: int = Field(64, ge=1)
    score_batch_size: int = Field(64, ge=1)
    # models
    lora: LoraSettings = Field(default_factory=LoraSettings)
    value_lora: LoraSettings | None = None  # defaults to `lora`
    value_init: Literal["helpfulness", "safety"] = "helpfulness"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    # bookkeeping
    save_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    sample_every: int = Field(10, ge=1)
    num_samples: int = Field(6, ge=0)
    seed: int = 0
    num_processes: int = Field(1, ge=1)
    launch: LaunchSettings = Field(default_factory=LaunchSettings, description="multi-node: nodes, this node's rank, "
                                   "the rendezvous (num_processes is then per node)")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with num_processes > 1: ddp keeps a whole copy of every model on each process; fsdp "
                           "shards them (FSDP2, one unit per decoder layer)")
    rollout_gather: bool = Field(
        True, description="under fsdp: gather the policy's weights once for the whole rollout (the full policy on "
                          "each GPU meanwhile) instead of every layer at every decode step")

    def smaller(self) -> "PPOConfig | None":
        """The OOM back-off: half the micro-batch (more accumulation, same mini-batch) and half the generation and
        scoring batches; None when all three are 1."""
        sizes = ("micro_batch_size", "generation_batch_size", "score_batch_size")
        if all(getattr(self, k) <= 1 for k in sizes):
            return None
        return self.model_copy(update={k: max(1, getattr(self, k) // 2) for k in sizes})

    def batch_summary(self) -> str:
        return (f"micro_batch_size {self.micro_batch_size} (mini-batch {self.mini_batch_size}), "
                f"generation_batch_size {self.generation_batch_size}, score_batch_size {self.score_batch_size}")


class PPOInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str  # the SFT (or rejection-sampling) checkpoint
    reward_helpfulness: str
    reward_safety: str
    prompts: str  # PPO prompts (kind "prompts", with is_safety)


# ------------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------------


@stage("ppo")
def run_ppo(config: PPOConfig, inputs: PPOInputs, run: StageRun) -> StageOutput:
    """PPO of the policy against both reward models; resumes from its newest checkpoint."""
    s = setup(config, inputs, run)
    metrics: dict = {}
    for it in range(s.start_iteration + 1, config.iterations + 1):
        clock = PhaseClock()
        # 1. rollout: this rank's share of the next prompts, answered by the current policy
        b_prompts = s.prompt_order.next_batch()
        b_responses, b_rollout_logprobs = rollout(s, b_prompts, config)
        clock.lap("rollout")
        # 2. score: log π_old, log π_ref, values, both RM scores -> per-token rewards
        exp = score(s, b_prompts, b_responses, b_rollout_logprobs, config, it)
        # 3. advantages: GAE over the per-token rewards, whitened over the global batch
        compute_advantages(exp, config)
        clock.lap("scoring")
        # 4. optimise: clipped policy and value updates over mini-batches, for ppo_epochs epochs
        stats, stopped = optimise(s, exp, config, it)
        clock.lap("optim")
        # 5. log: metrics averaged over every rank, sample rows, progress
        metrics = log_iteration(s, exp, stats, stopped, clock, it, config, run)
        # 6. checkpoint: every save_every iterations (the last iteration is saved as final below)
        if it % config.save_every == 0 and it < config.iterations:
            save_checkpoint(s, it, config, run.out_dir)
    return finish(s, metrics, config, run)


# ------------------------------------------------------------------------------------------------------------------
# Set-up: the models, the optimizers, the prompts and the random state
# ------------------------------------------------------------------------------------------------------------------


class PromptOrder:
    """Epochs over the prompts in a seeded random order. Each iteration takes the next ``per_iteration`` prompts of
    the global order (a new shuffled epoch starts when one runs out); each rank keeps its contiguous share."""

    def __init__(self, n_prompts: int, per_iteration: int, seed: int, rank: int = 0, world: int = 1):
        self.n_prompts, self.per_iteration, self.rank, self.world = n_prompts, per_iteration, rank, world
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.cursor = 0

    def next_batch(self) -> list[int]:
        picked: list[int] = []
        while len(picked) < self.per_iteration:
            if self.cursor >= len(self.order):
                self.order = list(range(self.n_prompts))
                self.rng.shuffle(self.order)
                self.cursor = 0
            take = min(self.per_iteration - len(picked), len(self.order) - self.cursor)
            picked += self.order[self.cursor:self.cursor + take]
            self.cursor += take
        share = self.per_iteration // self.world
        return picked[self.rank * share:(self.rank + 1) * share]

    def state_dict(self) -> dict:
        return {"order": self.order, "cursor": self.cursor, "rng": _random_state_to_json(self.rng.getstate())}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.cursor = [int(i) for i in state["order"]], int(state["cursor"])
        self.rng.setstate(_random_state_from_json(state["rng"]))


@dataclass
class PPOState:
    """What the loop carries from one iteration to the next."""

    policy: torch.nn.Module  # trainable causal LM (full or LoRA)
    reference: Reference  # frozen π0: the policy with adapters off (LoRA), else a frozen copy
    value: torch.nn.Module  # trainable scalar head, read on every token
    rm_helpfulness: RewardScorer
    rm_safety: RewardScorer
    opt_policy: torch.optim.Optimizer
    opt_value: torch.optim.Optimizer
    tokenizer: object
    prompts: list[PromptRecord]
    prompt_ids: list[list[int]]  # each prompt rendered in the Llama 2 chat format
    prompt_order: PromptOrder
    sampler: torch.Generator  # the rollouts' sampling
    device: torch.device
    bases: dict[str, str]  # what a saved LoRA policy / value points to as its base
    rollout_logprobs: bool  # log π_old recorded while sampling instead of a second forward pass
    start_iteration: int = 0
    samples: list[dict] = field(default_factory=list)  # the sample rows of samples.json


def setup(config: PPOConfig, inputs: PPOInputs, run: StageRun) -> PPOState:
    """Read the prompts, build the five roles and both optimizers, seed the sampling; when resuming, restore the
    checkpoint's models, optimizers, random state and prompt order."""
    import torch

    from .. import fsdp
    from ..model import build_model, build_reference

    rank, world = dist.rank(), dist.world_size()
    if config.prompts_per_iteration % world:
        raise ConfigError(f"prompts_per_iteration ({config.prompts_per_iteration}) must divide among {world} "
                          "processes")
    prompts = read_records(inputs.prompts, "prompts")
    tokenizer = load_tokenizer(inputs.policy)
    resume = run.resume(expect=(f"{MODELS_DIR}/.metadata", "rng-rank0.pt", "loop-rank0.json"))
    value_init = inputs.reward_helpfulness if config.value_init == "helpfulness" else inputs.reward_safety
    # Every start builds the roles as a fresh start does: an adapter checkpoint is merged first
    # (continue_adapter=False), so new LoRA adapters sit on the exact SFT policy and "adapters off" is the reference,
    # with no second copy. A resume then loads the checkpoint's trainable tensors over them. Sharded roles are
    # built on the CPU (in the dtype of this rank's device) and moved to the device shard by shard.
    sharded = fsdp.enabled(config)
    run.provenance["sharding"] = fsdp.describe(config)
    dtype = resolve_dtype(config.dtype)
    models = dict(dtype=dtype, seed=config.seed, gradient_checkpointing=config.gradient_checkpointing,
                  continue_adapter=False, device=fsdp.build_device(config))
    policy = build_model(inputs.policy, "policy", lora=config.lora, **models)
    reference = build_reference(policy, inputs.policy, dtype=dtype, device=models["device"])
    value_lora = config.value_lora if config.value_lora is not None else config.lora
    value = build_model(value_init, "value", lora=value_lora, **models)
    rms = [RewardScorer(path, device=models["device"], dtype=dtype, batch_size=config.score_batch_size)
           for path in (inputs.reward_helpfulness, inputs.reward_safety)]
    if sharded:
        shard_roles(policy, reference, value, rms)
    device = next(policy.parameters()).device
    s = PPOState(
        policy=policy, reference=reference, value=value, rm_helpfulness=rms[0], rm_safety=rms[1],
        opt_policy=_optimizer(policy, config.learning_rate, config),
        opt_value=_optimizer(value, config.value_learning_rate, config),
        tokenizer=tokenizer, prompts=prompts,
        prompt_ids=[encode_prompt(tokenizer, r.context_messages()) for r in prompts],
        prompt_order=PromptOrder(len(prompts), config.prompts_per_iteration, config.seed, rank, world),
        sampler=torch.Generator(device=device).manual_seed(config.seed + 1000 * rank), device=device,
        # the base a saved LoRA model points to: the model its new adapters were put on (an adapter is a valid base)
        bases={"policy": inputs.policy, VALUE_DIR: value_init},
        rollout_logprobs=config.rollout_logprobs if config.rollout_logprobs is not None
        else next(policy.parameters()).dtype == torch.float32)
    torch.manual_seed(config.seed + rank)
    if resume is not None:
        restore_checkpoint(s, resume, config)
        samples = run.out_dir / "samples.json"
        if samples.exists():  # only the iterations the checkpoint covers: later ones are logged again as they re-run
            s.samples = [r for r in json.loads(samples.read_text()) if r["iteration"] <= s.start_iteration]
    elif dist.is_main():
        run.out_dir.mkdir(parents=True, exist_ok=True)
    return s


def shard_roles(policy: torch.nn.Module, reference: Reference, value: torch.nn.Module, rms: list[RewardScorer]
                ) -> None:
    """FSDP2 over the ranks for every role (``sharding: fsdp``), before the optimizers see the parameters: the policy
    (under LoRA the base is sharded once: the reference is the same model with its adapters off), a full policy's
    frozen reference, the value model and both reward models. The reward models are sharded too, not replicated:
    they only score, one forward per batch, so sharding costs one all-gather of their weights per scoring batch,
    while two replicated copies would need 2 x 140 GB on every GPU at 70B."""
    from .. import fsdp

    frozen_reference = [reference.frozen] if reference.frozen is not None else []
    for model in (policy, *frozen_reference, value, *(rm.model for rm in rms)):
        fsdp.shard(model)
    for rm in rms:
        rm.device = next(rm.model.parameters()).device


def _optimizer(model: torch.nn.Module, lr: float, config: PPOConfig) -> torch.optim.Optimizer:
    """AdamW as in the paper: β1 0.9, β2 0.95, eps 1e-5, weight decay 0.1 (config)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                             weight_decay=config.weight_decay)


# ------------------------------------------------------------------------------------------------------------------
# Rollout and scoring
# ------------------------------------------------------------------------------------------------------------------


def rollout(s: PPOState, b_prompts: list[int], config: PPOConfig
            ) -> tuple[list[list[int]], list[torch.Tensor] | None]:
    """One response per prompt from the current policy (KV cache; stop at EOS or ``max_new_tokens``), in chunks of
    ``generation_batch_size``. Returns the response ids (EOS included when the model stopped) and, when
    ``s.rollout_logprobs``, each response's token log-probs under the policy that sampled it (log π_old)."""
    from .. import fsdp
    from ..generation import generate_ids

    b_responses: list[list[int]] = []
    b_logprobs: list[torch.Tensor] | None = [] if s.rollout_logprobs else None
    # a sharded policy is gathered once for the rollout (a no-op unsharded), not at every decode step
    with fsdp.gathered(s.policy) if config.rollout_gather else contextlib.nullcontext():
        for start in range(0, len(b_prompts), config.generation_batch_size):
            chunk = b_prompts[start:start + config.generation_batch_size]
            b_responses += generate_ids(s.policy, [s.prompt_ids[i] for i in chunk],
                                        eos_token_id=s.tokenizer.eos_token_id, pad_token_id=s.tokenizer.pad_token_id,
                                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                        top_p=config.top_p, generator=s.sampler, logprobs=b_logprobs)
    return b_responses, b_logprobs


@dataclass
class Experience:
    """One iteration's rollouts on this rank, scored (after OpenRLHF's ``Experience``). B rollouts; T = the longest
    response (shorter ones are padded; ``batch.mask`` (B, T) marks the real response tokens)."""

    prompts: list[int]  # (B,) prompt indices
    responses: list[list[int]]  # (B,) response ids, EOS included when the model stopped
    batch: "Batch"  # (B, W) prompt + response ids; response_ids (B, T), mask (B, T)
    finished: torch.Tensor  # (B,) the response ended with EOS
    logprobs: torch.Tensor  # (B, T) log π_old(a|s): the policy that sampled
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(a|s)
    values: torch.Tensor  # (B, T) V_old(s)
    rm_helpfulness: torch.Tensor  # (B,) raw helpfulness RM score
    rm_safety: torch.Tensor  # (B,) raw safety RM score
    reward_combined: torch.Tensor  # (B,) Rc, on the probability scale
    score: torch.Tensor  # (B,) whiten(logit(Rc)), plus the missing-EOS penalty
    kl: torch.Tensor  # (B, T) log π_old - log π_ref
    rewards: torch.Tensor  # (B, T) -β·kl on every token, plus the score on the last one
    advantages: torch.Tensor | None = None  # (B, T) GAE, whitened
    returns: torch.Tensor | None = None  # (B, T) advantages + values


@no_grad
def score(s: PPOState, b_prompts: list[int], b_responses: list[list[int]],
          b_rollout_logprobs: list[torch.Tensor] | None, config: PPOConfig, it: int) -> Experience:
    """The frozen side of the iteration, and the reward.

    Llama 2 §3.2.3: ``Rc = Rs if is_safety(prompt) or Rs < 0.15 else Rh`` on sigmoid scores, ``whiten(logit(Rc))``
    (whitened over the global batch). As in Ziegler et al. 2019 and "The N implementation details of RLHF with PPO"
    (Huang et al. 2024): the score is the reward of the last token, every token pays ``β·(log π_old - log π_ref)``,
    and a response that hit the length limit without EOS gets a fixed penalty."""
    import torch

    from .. import ppo_core as core

    batch = Batch([s.prompt_ids[i] for i in b_prompts], b_responses, s.tokenizer.pad_token_id, s.device)
    finished = torch.tensor([bool(r) and r[-1] == s.tokenizer.eos_token_id for r in b_responses], device=s.device)
    logprobs, ref_logprobs, values = _frozen_forwards(s, batch, b_rollout_logprobs, config, it)
    full = [s.prompt_ids[i] + r for i, r in zip(b_prompts, b_responses)]
    rm_h = s.rm_helpfulness.score_ids(full).to(s.device)
    rm_s = s.rm_safety.score_ids(full).to(s.device)
    is_safety = torch.tensor([bool(s.prompts[i].is_safety) for i in b_prompts], device=s.device)
    rc = core.combine_rewards(rm_h, rm_s, is_safety, config.safety_threshold, config.piecewise_reward)
    b_score = core.final_scores(rc, config.use_logit, config.whiten_rewards, all_sum=dist.all_sum)
    if config.missing_eos_penalty is not None:
        b_score = torch.where(finished, b_score, b_score + config.missing_eos_penalty)
    beta = config.kl_beta if config.kl_penalty else 0.0
    rewards, kl = core.token_rewards(b_score, logprobs, ref_logprobs, batch.mask, beta)
    # the sources first, so the error names where a NaN came from, not only where it ended up
    _check_finite(it, rm_helpfulness=rm_h, rm_safety=rm_s, values=values, rewards=rewards)
    return Experience(prompts=b_prompts, responses=b_responses, batch=batch, finished=finished, logprobs=logprobs,
                      ref_logprobs=ref_logprobs, values=values, rm_helpfulness=rm_h, rm_safety=rm_s,
                      reward_combined=rc, score=b_score, kl=kl, rewards=rewards)


def _frozen_forwards(s: PPOState, batch: "Batch", b_rollout_logprobs: list[torch.Tensor] | None, config: PPOConfig,
                     it: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log π_old (unless recorded while sampling), log π_ref and V_old for the batch, ``score_batch_size`` rows at a
    time (no graph: the largest batch that fits)."""
    import torch

    s.policy.eval()
    s.value.eval()
    logprobs, ref_logprobs, values = [], [], []
    for rows in _in_chunks(batch.n, config.score_batch_size):
        mb = batch.rows(rows)
        if b_rollout_logprobs is None:
            lp, _, logits = policy_forward(s.policy, mb)
            _check_finite(it, policy_logits=logits)
            logprobs.append(lp)
        with s.reference.model() as ref:
            ref_logprobs.append(policy_forward(ref, mb)[0])
        values.append(value_forward(s.value, mb))
    if b_rollout_logprobs is not None:
        old = torch.zeros_like(batch.mask)
        for i, lp in enumerate(b_rollout_logprobs):
            old[i, :len(lp)] = lp
        _check_finite(it, policy_logprobs=old)
    else:
        old = torch.cat(logprobs)
    return old, torch.cat(ref_logprobs), torch.cat(values)


@no_grad
def compute_advantages(exp: Experience, config: PPOConfig) -> None:
    """GAE (Schulman et al. 2016) over the per-token rewards, γ and λ from the config (the value after the last token
    is 0); the advantages are whitened over every rank's tokens, the returns are advantages + values."""
    from .. import ppo_core as core

    advantages, exp.returns = core.gae(exp.rewards, exp.values, exp.batch.mask, config.gamma, config.lam)
    exp.advantages = core.whiten(advantages, exp.batch.mask, all_sum=dist.all_sum) if config.whiten_advantages \
        else advantages


# ------------------------------------------------------------------------------------------------------------------
# Optimisation
# ------------------------------------------------------------------------------------------------------------------

STAT_NAMES = ("policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy", "value_clip_frac")


def optimise(s: PPOState, exp: Experience, config: PPOConfig, it: int) -> tuple[dict[str, list[float]], bool]:
    """PPO's update (Schulman et al. 2017): ``ppo_epochs`` passes over the batch in shuffled mini-batches of
    ``mini_batch_size`` rollouts (all ranks together). Returns each micro-batch's statistics and whether the epochs
    stopped early because the approximate KL to the sampling policy passed ``target_kl``."""
    import torch

    s.policy.train()
    s.value.train()
    stats: dict[str, list[float]] = {k: [] for k in STAT_NAMES}
    mb_size = max(1, config.mini_batch_size // dist.world_size())
    for epoch in range(config.ppo_epochs):
        b_order = torch.randperm(exp.batch.n, generator=torch.Generator().manual_seed(config.seed + it * 31 + epoch))
        for start in range(0, exp.batch.n, mb_size):
            update_mini_batch(s, exp, b_order[start:start + mb_size], config, it, stats)
        if config.target_kl is not None:
            approx_kl = float(dist.all_mean(torch.tensor(stats["approx_kl"], device=s.device).mean()))
            if approx_kl > config.target_kl:
                return stats, True
    return stats, False


def update_mini_batch(s: PPOState, exp: Experience, mb_rows: torch.Tensor, config: PPOConfig, it: int,
                      stats: dict[str, list[float]]) -> None:
    """One optimizer step of the policy and of the value model: the clipped surrogate and the clipped value loss,
    accumulated over micro-batches weighted by their share of the mini-batch's tokens, gradients averaged over the
    ranks and clipped to ``max_grad_norm``. The token share is of every rank's tokens (times the world size, since
    the ranks' gradients are averaged), so the step is the token mean over the whole mini-batch, as in one process,
    whatever each rank's response lengths."""
    import torch

    from .. import ppo_core as core

    s.opt_policy.zero_grad(set_to_none=True)
    s.opt_value.zero_grad(set_to_none=True)
    mb_tokens = dist.all_sum(exp.batch.mask[mb_rows].sum().reshape(1)).clamp(min=1) / dist.world_size()
    for chunk in _in_chunks(len(mb_rows), config.micro_batch_size):
        rows = mb_rows[chunk].to(s.device)
        mb = exp.batch.rows(rows)
        weight = float(mb.mask.sum() / mb_tokens)
        mb_logprobs, mb_entropy, mb_logits = policy_forward(s.policy, mb, with_entropy=True)
        pg_loss, pg_stats = core.policy_loss(mb_logprobs, exp.logprobs[rows], exp.advantages[rows], mb.mask,
                                             config.clip_range)
        mb_values = value_forward(s.value, mb)
        v_loss, v_stats = core.value_loss(mb_values, exp.values[rows], exp.returns[rows], mb.mask,
                                          config.value_clip_range)
        _check_finite(it, policy_loss=pg_loss, value_loss=v_loss, policy_logits=mb_logits)
        (pg_loss * weight).backward()
        (v_loss * weight).backward()
        stats["policy_loss"].append(pg_loss.item())
        stats["value_loss"].append(v_loss.item())
        stats["entropy"].append(float(core.masked_mean(mb_entropy, mb.mask)))
        stats["clip_frac"].append(pg_stats["clip_frac"])
        stats["approx_kl"].append(pg_stats["approx_kl"])
        stats["value_clip_frac"].append(v_stats["value_clip_frac"])
    for model, opt in ((s.policy, s.opt_policy), (s.value, s.opt_value)):
        params = [p for p in model.parameters() if p.requires_grad]
        dist.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()


# ------------------------------------------------------------------------------------------------------------------
# Logging, checkpoints, the final save
# ------------------------------------------------------------------------------------------------------------------


class PhaseClock:
    """Wall time of each phase of an iteration (the ``time_<phase>_s`` metrics)."""

    def __init__(self):
        self.timer = Timer()
        self.laps: dict[str, float] = {}
        self._last = 0.0

    def lap(self, phase: str) -> None:
        now = self.timer.elapsed
        self.laps[phase] = now - self._last
        self._last = now


def log_iteration(s: PPOState, exp: Experience, stats: dict[str, list[float]], stopped: bool, clock: PhaseClock,
                  it: int, config: PPOConfig, run: StageRun) -> dict:
    """The iteration's metrics, with stable names, as means over every rank's rollouts; sample rows every
    ``sample_every`` iterations; a progress event."""
    import torch

    from .. import ppo_core as core


    def g(t: torch.Tensor) -> float:
        return float(dist.all_mean(t.float().mean().reshape(1)).item())

    metrics = {
        "iteration": it,
        "step": it,
        "rm_helpfulness": g(exp.rm_helpfulness),
        "rm_safety": g(exp.rm_safety),
        "rm_helpfulness_prob": g(torch.sigmoid(exp.rm_helpfulness)),
        "rm_safety_prob": g(torch.sigmoid(exp.rm_safety)),
        "reward_combined": g(exp.reward_combined),
        "reward_score": g(exp.score),
        "kl_ref": g(exp.kl.sum(1)),
        **{k: g(torch.tensor(v, device=s.device)) for k, v in stats.items()},
        "explained_variance": core.explained_variance(exp.values, exp.returns, exp.batch.mask),
        "response_length": g(exp.batch.mask.sum(1)),
        "no_eos_frac": g((~exp.finished).float()),
        "early_stopped": stopped,
        **{f"time_{phase}_s": round(t, 3) for phase, t in clock.laps.items()},
        "time_iteration_s": round(clock.timer.elapsed, 3),
    }
    if dist.is_main():
        append_jsonl(run.out_dir / METRICS_FILE, metrics)
        if config.num_samples and (it % config.sample_every == 0 or it == config.iterations):
            s.samples += sample_rows(s, exp, it, config.num_samples)
            atomic_write_json(run.out_dir / "samples.json", s.samples)
    run.report(it, config.iterations, metrics, samples=[r for r in s.samples if r["iteration"] == it])
    return metrics


def sample_rows(s: PPOState, exp: Experience, it: int, n: int) -> list[dict]:
    """The first ``n`` rollouts of the iteration, decoded, with their scores (samples.json)."""
    eos = s.tokenizer.eos_token_id
    return [{
        "iteration": it,
        "prompt": s.prompts[i].context_messages()[-1]["content"],
        "response": s.tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip(),
        "rm_helpfulness": round(float(exp.rm_helpfulness[j]), 4),
        "rm_safety": round(float(exp.rm_safety[j]), 4),
        "reward_combined": round(float(exp.reward_combined[j]), 4),
        "is_safety": bool(s.prompts[i].is_safety),
    } for j, (i, r) in enumerate(zip(exp.prompts[:n], exp.responses[:n]))]


def save_checkpoint(s: PPOState, it: int, config: PPOConfig, out_dir: Path) -> None:
    """``checkpoint-<it>``: the policy's and the value model's trainable tensors (the adapters under LoRA) and both
    optimizers as a DCP checkpoint (``models/``: each rank writes its shards, ``llama2_align.dcp``), and per rank the
    random state as tensors (``rng-rank<r>.pt``, read back with ``weights_only=True``) and the loop state as JSON
    (``loop-rank<r>.json``: iteration, prompt order, Python's random state). Loading runs no pickled code. Every rank
    writes into ``.staging/checkpoint-<it>``, which rank 0 renames into place once all are done."""
    import torch

    from .. import dcp

    rank, tmp = dist.rank(), out_dir / STAGING_DIR / f"checkpoint-{it}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(tmp / MODELS_DIR, {"policy": (s.policy, s.opt_policy), VALUE_DIR: (s.value, s.opt_value)})
    tensors = {"rng_torch": torch.get_rng_state(), "rng_sampler": s.sampler.get_state()}
    if torch.cuda.is_available():
        tensors["rng_cuda"] = torch.cuda.get_rng_state_all()
    torch.save(tensors, tmp / f"rng-rank{rank}.pt")
    atomic_write_json(tmp / f"loop-rank{rank}.json", {
        "iteration": it, "world_size": dist.world_size(), "prompt_order": s.prompt_order.state_dict(),
        "python_random": _random_state_to_json(random.getstate())})
    dist.barrier()
    if dist.is_main():
        target = out_dir / f"checkpoint-{it}"
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        prune_checkpoints(out_dir, config.keep_checkpoints)
    dist.barrier()


def restore_checkpoint(s: PPOState, ckpt: Path, config: PPOConfig) -> None:
    """The models' trainable tensors and the optimizers (DCP reshards them to this world size, sharded or not), and
    this rank's random state and prompt order. Resumed on more ranks than saved it, a new rank reseeds its random
    state (from the seed, its rank and the iteration) and takes rank 0's prompt order (the same on every rank)."""
    import torch

    from .. import dcp

    rank = dist.rank()
    dcp.load(ckpt / MODELS_DIR, {"policy": (s.policy, s.opt_policy), VALUE_DIR: (s.value, s.opt_value)})
    own = (ckpt / f"loop-rank{rank}.json").exists()
    loop = json.loads((ckpt / f"loop-rank{rank if own else 0}.json").read_text())
    s.start_iteration = int(loop["iteration"])
    if s.start_iteration != checkpoint_step(ckpt):
        raise RuntimeError(f"{ckpt}: its loop state is for iteration {s.start_iteration}")
    s.prompt_order.load_state_dict(loop["prompt_order"])
    if own:
        tensors = torch.load(ckpt / f"rng-rank{rank}.pt", weights_only=True, map_location="cpu")
        torch.set_rng_state(tensors["rng_torch"])
        s.sampler.set_state(tensors["rng_sampler"])
        if "rng_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["rng_cuda"])
        random.setstate(_random_state_from_json(loop["python_random"]))
    else:
        torch.manual_seed(config.seed + rank + 7919 * s.start_iteration)
        s.sampler.manual_seed(config.seed + 1000 * rank + 7919 * s.start_iteration)
        random.seed(config.seed + rank + 7919 * s.start_iteration)


def finish(s: PPOState, metrics: dict, config: PPOConfig, run: StageRun) -> StageOutput:
    """Save the aligned policy (``final/``) and the value model; the curves; the last iteration's metrics."""
    from ..plots import plot_curves

    artifacts: dict[str, str] = {}
    final_metrics = {k: v for k, v in metrics.items() if k != "step"}
    _save_models(s, run.out_dir / FINAL_DIR, run.out_dir / VALUE_DIR)  # every rank: a sharded model is gathered
    if dist.is_main():
        logs = read_jsonl(run.out_dir / METRICS_FILE)
        if plot_curves(logs, ["reward_combined", "kl_ref", "response_length"], run.out_dir / "curves.png",
                       title="PPO", x="iteration"):
            artifacts["curves"] = "curves.png"
        if s.samples:
            artifacts["samples"] = "samples.json"
        first = logs[: max(1, min(3, len(logs)))]
        final_metrics["reward_combined_first"] = sum(r["reward_combined"] for r in first) / len(first)
        final_metrics["iterations"] = config.iterations
    return StageOutput(final=run.out_dir / FINAL_DIR, metrics=final_metrics,
                       steps=metrics.get("iteration", s.start_iteration), planned_steps=config.iterations,
                       artifacts=artifacts)


def _save_models(s: PPOState, policy_dir: Path, value_dir: Path) -> None:
    """The policy and the value model as HF safetensors directories (rank 0 writes; called on every rank)."""
    from .. import fsdp
    from ..model import is_peft

    for model, out, role in ((s.policy, policy_dir, "policy"), (s.value, value_dir, VALUE_DIR)):
        fsdp.save_final(model, out, s.tokenizer, role=role, base=s.bases[role] if is_peft(model) else None)


def _random_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return int(version), tuple(int(x) for x in internal), gauss


# ------------------------------------------------------------------------------------------------------------------
# Forward passes over (prompt + response) batches
# ------------------------------------------------------------------------------------------------------------------


class Batch:
    """Prompt+response sequences right-padded into one tensor, with the response slice of each row."""

    def __init__(self, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
        import torch

        self.n = len(prompts)
        self.p_len = torch.tensor([len(p) for p in prompts])
        self.r_len = torch.tensor([max(1, len(r)) for r in responses])
        width = int((self.p_len + self.r_len).max())
        self.T = int(self.r_len.max())
        ids = torch.full((self.n, width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        resp = torch.full((self.n, self.T), pad_id, dtype=torch.long)
        mask = torch.zeros((self.n, self.T))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            r = r or [pad_id]
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            resp[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        self.input_ids, self.attention_mask = ids.to(device), attn.to(device)
        self.response_ids, self.mask = resp.to(device), mask.to(device)
        # index of the position whose output predicts response token t: p_len - 1 + t
        pos = (self.p_len - 1).unsqueeze(1) + torch.arange(self.T).unsqueeze(0)
        self.gather_pos = pos.clamp(max=width - 1).to(device)

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, W, ...] -> [B, T, ...] at the positions that predict the response tokens."""
        idx = self.gather_pos
        if hidden.dim() == 3:
            return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        return hidden.gather(1, idx)

    def rows(self, idx: torch.Tensor) -> "Batch":
        """The sub-batch of rows ``idx``, trimmed to its own longest sequence."""
        sub = Batch.__new__(Batch)
        sub.n = len(idx)
        sub.p_len, sub.r_len = self.p_len[idx.cpu()], self.r_len[idx.cpu()]
        width = int((sub.p_len + sub.r_len).max())
        sub.input_ids = self.input_ids[idx, :width]
        sub.attention_mask = self.attention_mask[idx, :width]
        sub.response_ids, sub.mask = self.response_ids[idx], self.mask[idx]
        sub.gather_pos = self.gather_pos[idx].clamp(max=width - 1)
        sub.T = self.T
        return sub


def policy_forward(model, batch: Batch, with_entropy: bool = False):
    """Log-probs of the response tokens (and their entropy) under a causal LM."""
    import torch

    from .. import ppo_core as core

    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = batch.select(out.logits)
    logp = core.gather_logprobs(logits, batch.response_ids)
    ent = None
    if with_entropy:  # a metric only: no graph (it would hold a [B, T, V] softmax until backward)
        with torch.no_grad():
            ent = core.entropy_from_logits(logits)
    return logp, ent, logits


def value_forward(model, batch: Batch) -> torch.Tensor:
    """Per-token values: the scalar head applied to every hidden state (not only the last one). The model's own
    forward runs (it pools the last token's value; FSDP's hooks run with it), and a hook on the head keeps all."""
    from ..model import unwrap

    kept: list[torch.Tensor] = []
    hook = unwrap(model).score.register_forward_hook(lambda _module, _args, out: kept.append(out))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        hook.remove()
    return batch.select(kept[0].squeeze(-1)).float()


def _check_finite(iteration: int, **tensors) -> None:
    import torch

    for name, t in tensors.items():
        if t is not None and not torch.isfinite(t).all():
            raise NonFiniteError(f"PPO iteration {iteration}: {name} contains NaN or inf; stopping (not training on)")


def _in_chunks(n: int, size: int):
    import torch

    for s in range(0, n, size):
        yield torch.arange(s, min(n, s + size))
