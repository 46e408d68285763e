"""PPO against the two reward models, as in Llama 2-Chat (§3.2.3), written as a readable reference loop.

One iteration:
1. rollout   sample responses for a batch of prompts from the policy (KV cache, temperature, top-p, EOS stop);
2. scoring   log-probs of the policy and the frozen reference, per-token values, both RM scores;
             reward ``whiten(logit(Rc))`` on the last token (Rc: the safety-gated piecewise reward), a per-token
             KL penalty ``-β·(log π - log π0)``, a fixed penalty when a response hits the length limit without EOS;
3. optimise  GAE advantages (whitened), several epochs of clipped policy and value updates over mini-batches.

Roles: the policy (SFT checkpoint, full or LoRA), the reference (the SFT policy; with LoRA the same weights with
adapters disabled), a value model initialised from the helpfulness reward model, the two frozen reward models.
Under torchrun every rank rolls out its own share of the prompts; gradients are averaged across ranks and rank 0
writes. Every piece of the reward switches off in config, for the paper's ablations.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from .. import ppo_core as core
from ..chat import encode_prompt
from ..data import read_records
from ..generation import generate_ids
from ..io import append_jsonl, atomic_dir, atomic_write_json, read_jsonl
from ..launch import LaunchSettings
from ..model import LoraSettings, build_model, build_reference, is_peft, save_model, unwrap
from ..tokenizer import load_tokenizer
from .common import (FINAL_DIR, METRICS_FILE, STAGING_DIR, ProgressFn, StageResult, Timer, input_fingerprints,
                     is_main_process, latest_checkpoint, load_result, provenance, prune_checkpoints,
                     truncate_metrics, write_result)
from .reward import RewardScorer


class NonFiniteError(RuntimeError):
    """A NaN or inf appeared; the stage stops instead of training on."""


class PPOConfig(BaseModel):
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


    @property
    def batch_size(self) -> int:
        """The optimizer step's batch (a mini-batch); the OOM back-off keeps it fixed."""
        return self.mini_batch_size

    def gradient_accumulation(self, world_size: int = 1) -> int:
        return max(1, self.mini_batch_size // (self.micro_batch_size * world_size))


class PPOInputs(BaseModel):
    policy: str  # the SFT (or rejection-sampling) checkpoint
    reward_helpfulness: str
    reward_safety: str
    prompts: str  # PPO prompts (kind "prompts", with is_safety)


def ppo_config_for(size: str) -> PPOConfig:
    if size in ("micro", "tiny", "small"):
        return PPOConfig(iterations=30, prompts_per_iteration=64, mini_batch_size=32, micro_batch_size=32,
                         ppo_epochs=2, learning_rate=3e-5, value_learning_rate=1e-4, weight_decay=0.0,
                         kl_beta=0.02, max_new_tokens=24, save_every=10, sample_every=10,
                         generation_batch_size=64, score_batch_size=128)
    beta = 0.005 if size in ("llama2-70b", "llama2-34b") else 0.01
    return PPOConfig(kl_beta=beta, lora=LoraSettings(enabled=size != "llama2-7b-full"), gradient_checkpointing=True)


# ------------------------------------------------------------------------------------------------------------------
# Distributed helpers: a plain torch.distributed data-parallel loop (no-ops in one process)
# ------------------------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def _all_mean(x: torch.Tensor) -> torch.Tensor:
    d = _dist()
    if d is None:
        return x
    x = x.clone()
    d.all_reduce(x)
    return x / d.get_world_size()


def _average_gradients(params) -> None:
    d = _dist()
    if d is None:
        return
    for p in params:
        if p.grad is not None:
            d.all_reduce(p.grad)
            p.grad /= d.get_world_size()


def _gather_cat(x: torch.Tensor) -> torch.Tensor:
    d = _dist()
    if d is None:
        return x
    parts = [torch.empty_like(x) for _ in range(d.get_world_size())]
    d.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------------------------
# Forward passes over (prompt + response) batches
# ------------------------------------------------------------------------------------------------------------------


class Batch:
    """Prompt+response sequences right-padded into one tensor, with the response slice of each row."""

    def __init__(self, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
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


def _sub(batch: Batch, idx: torch.Tensor) -> Batch:
    sub = Batch.__new__(Batch)
    sub.n = len(idx)
    width = int((batch.p_len[idx.cpu()] + batch.r_len[idx.cpu()]).max())
    sub.input_ids = batch.input_ids[idx, :width]
    sub.attention_mask = batch.attention_mask[idx, :width]
    sub.response_ids, sub.mask = batch.response_ids[idx], batch.mask[idx]
    sub.gather_pos = batch.gather_pos[idx].clamp(max=width - 1)
    sub.T = batch.T
    return sub


def policy_forward(model, batch: Batch, with_entropy: bool = False):
    """Log-probs of the response tokens (and their entropy) under a causal LM."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = batch.select(out.logits)
    logp = core.gather_logprobs(logits, batch.response_ids)
    ent = None
    if with_entropy:  # a metric only: no graph (it would hold a [B, T, V] softmax until backward)
        with torch.no_grad():
            ent = core.entropy_from_logits(logits)
    return logp, ent, logits


def value_forward(model, batch: Batch) -> torch.Tensor:
    """Per-token values: the scalar head applied to every hidden state (not only the last one)."""
    base = unwrap(model)
    hidden = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    values = base.score(hidden.last_hidden_state).squeeze(-1)
    return batch.select(values).float()


def _check_finite(iteration: int, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not torch.isfinite(t).all():
            raise NonFiniteError(f"PPO iteration {iteration}: {name} contains NaN or inf; stopping (not training on)")


def _in_chunks(n: int, size: int):
    for s in range(0, n, size):
        yield torch.arange(s, min(n, s + size))


# ------------------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------------------


def _optimizer(model, lr: float, cfg: PPOConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def _rng_state(gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "sampler": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    gen.set_state(state["sampler"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_ppo(config: PPOConfig, inputs: PPOInputs, out_dir: str | Path, progress: ProgressFn | None = None
            ) -> StageResult:
    out_dir = Path(out_dir)
    done = load_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    rank, world = _rank_world()
    cfg = config

    prompts = read_records(inputs.prompts, "prompts")
    tokenizer = load_tokenizer(inputs.policy)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = [encode_prompt(tokenizer, r.context_messages()) for r in prompts]
    is_safety = [bool(r.is_safety) for r in prompts]
    if cfg.prompts_per_iteration % world:
        raise ValueError(f"prompts_per_iteration ({cfg.prompts_per_iteration}) must divide among {world} processes")
    per_rank = cfg.prompts_per_iteration // world

    # --- models -------------------------------------------------------------------------------------------
    resume = latest_checkpoint(out_dir)
    policy_src = str(resume / "policy") if resume else inputs.policy
    value_src = str(resume / "value") if resume else inputs.reward_helpfulness if cfg.value_init == "helpfulness" \
        else inputs.reward_safety
    # A fresh start merges an adapter checkpoint first (continue_adapter=False), so new LoRA adapters sit on the
    # exact SFT policy and "adapters off" is the reference, with no second copy; a resume continues its adapters.
    policy = build_model(policy_src, "policy", lora=None if resume else cfg.lora, dtype=cfg.dtype, seed=cfg.seed,
                         gradient_checkpointing=cfg.gradient_checkpointing, continue_adapter=bool(resume))
    reference = build_reference(policy, inputs.policy, dtype=cfg.dtype)
    value_lora = cfg.value_lora if cfg.value_lora is not None else cfg.lora
    value = build_model(value_src, "value", lora=None if resume else value_lora, dtype=cfg.dtype, seed=cfg.seed,
                        gradient_checkpointing=cfg.gradient_checkpointing, continue_adapter=bool(resume))
    rm_h = RewardScorer(inputs.reward_helpfulness, dtype=cfg.dtype, batch_size=cfg.score_batch_size)
    rm_s = RewardScorer(inputs.reward_safety, dtype=cfg.dtype, batch_size=cfg.score_batch_size)
    device = next(policy.parameters()).device
    reuse_rollout_logprobs = cfg.rollout_logprobs if cfg.rollout_logprobs is not None else \
        next(policy.parameters()).dtype == torch.float32
    # The base a saved LoRA policy/value points to: the model its new adapters were put on (an adapter directory
    # is a valid base: loading merges it first).
    policy_base = inputs.policy
    value_base = inputs.reward_helpfulness if cfg.value_init == "helpfulness" else inputs.reward_safety

    opt_p = _optimizer(policy, cfg.learning_rate, cfg)
    opt_v = _optimizer(value, cfg.value_learning_rate, cfg)
    sampler = torch.Generator(device=device)
    sampler.manual_seed(cfg.seed + 1000 * rank)
    torch.manual_seed(cfg.seed + rank)
    order_rng = random.Random(cfg.seed)
    order: list[int] = []
    cursor = 0
    start_it = 0
    if resume is not None:
        state = torch.load(resume / f"state-rank{rank}.pt", weights_only=False, map_location="cpu")
        opt_p.load_state_dict(state["opt_policy"])
        opt_v.load_state_dict(state["opt_value"])
        _set_rng_state(state["rng"], sampler)
        order_rng.setstate(state["order_rng"])
        order, cursor, start_it = state["order"], state["cursor"], state["iteration"]
        truncate_metrics(out_dir, start_it)
    elif is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)

    def next_prompts() -> list[int]:
        nonlocal order, cursor
        picked = []
        while len(picked) < cfg.prompts_per_iteration:
            if cursor >= len(order):
                order = list(range(len(prompt_ids)))
                order_rng.shuffle(order)
                cursor = 0
            take = min(cfg.prompts_per_iteration - len(picked), len(order) - cursor)
            picked += order[cursor:cursor + take]
            cursor += take
        return picked[rank * per_rank:(rank + 1) * per_rank]  # this rank's share

    samples_log: list[dict] = []
    if resume is not None and (out_dir / "samples.json").exists():
        import json

        # only the samples of iterations the checkpoint covers: later ones are logged again as they re-run
        samples_log = [s for s in json.loads((out_dir / "samples.json").read_text()) if s["iteration"] <= start_it]
    last_metrics: dict = {}
    for it in range(start_it + 1, cfg.iterations + 1):
        t_it = Timer()
        idx = next_prompts()
        # --- 1. rollout -----------------------------------------------------------------------------------
        responses: list[list[int]] = []
        rollout_lps: list[torch.Tensor] | None = [] if reuse_rollout_logprobs else None
        for s in range(0, len(idx), cfg.generation_batch_size):
            chunk = idx[s:s + cfg.generation_batch_size]
            responses += generate_ids(policy, [prompt_ids[i] for i in chunk], eos_token_id=eos, pad_token_id=pad,
                                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, generator=sampler, logprobs=rollout_lps)
        t_rollout = t_it.elapsed

        # --- 2. scoring -----------------------------------------------------------------------------------
        t_s = Timer()
        batch = Batch([prompt_ids[i] for i in idx], responses, pad, device)
        finished = torch.tensor([bool(r) and r[-1] == eos for r in responses], device=device)
        with torch.no_grad():
            old_logp, ref_logp, old_values = [], [], []
            policy.eval()
            value.eval()
            for c in _in_chunks(batch.n, cfg.score_batch_size):  # no graph: the largest batch that fits
                sub = _sub(batch, c)
                if rollout_lps is None:
                    lp, _, logits = policy_forward(policy, sub)
                    _check_finite(it, policy_logits=logits)
                    old_logp.append(lp)
                with reference.model() as ref:
                    rlp, _, _ = policy_forward(ref, sub)
                ref_logp.append(rlp)
                old_values.append(value_forward(value, sub))
            if rollout_lps is not None:
                old_logp = torch.zeros_like(batch.mask)
                for i, lp in enumerate(rollout_lps):
                    old_logp[i, :len(lp)] = lp
                _check_finite(it, policy_logprobs=old_logp)
            else:
                old_logp = torch.cat(old_logp)
            ref_logp, old_values = torch.cat(ref_logp), torch.cat(old_values)
            full = [prompt_ids[i] + r for i, r in zip(idx, responses)]
            raw_h = rm_h.score_ids(full).to(device)
            raw_s = rm_s.score_ids(full).to(device)
            safety_flags = torch.tensor([is_safety[i] for i in idx], device=device)
            rc = core.combine_rewards(raw_h, raw_s, safety_flags, cfg.safety_threshold, cfg.piecewise_reward)
            x = core.logit(rc) if cfg.use_logit else rc
            if cfg.whiten_rewards:  # whiten over the global batch
                all_x = _gather_cat(x)
                x = (x - all_x.mean()) / (all_x.std(unbiased=False) + 1e-8)
            score = x
            if cfg.missing_eos_penalty is not None:
                score = torch.where(finished, score, score + cfg.missing_eos_penalty)
            beta = cfg.kl_beta if cfg.kl_penalty else 0.0
            rewards, kl = core.token_rewards(score, old_logp, ref_logp, batch.mask, beta)
            # the sources first, so the error names where a NaN came from, not only where it ended up
            _check_finite(it, rm_helpfulness=raw_h, rm_safety=raw_s, values=old_values, rewards=rewards)
            adv, returns = core.gae(rewards, old_values, batch.mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = core.whiten(adv, batch.mask)
        t_scoring = t_s.elapsed

        # --- 3. optimisation ------------------------------------------------------------------------------
        t_o = Timer()
        policy.train()
        value.train()
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl",
                                                         "entropy", "value_clip_frac")}
        stop = False
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(batch.n, generator=sampler.__class__().manual_seed(cfg.seed + it * 31 + epoch))
            mini = max(1, cfg.mini_batch_size // world)
            for ms in range(0, batch.n, mini):
                mb = perm[ms:ms + mini]
                opt_p.zero_grad(set_to_none=True)
                opt_v.zero_grad(set_to_none=True)
                n_tokens = batch.mask[mb].sum().clamp(min=1)
                for c in _in_chunks(len(mb), cfg.micro_batch_size):
                    rows = mb[c].to(device)
                    sub = _sub(batch, rows)
                    weight = float(sub.mask.sum() / n_tokens)  # token-weighted accumulation
                    lp, ent, logits = policy_forward(policy, sub, with_entropy=True)
                    pl, pstats = core.policy_loss(lp, old_logp[rows], adv[rows], sub.mask, cfg.clip_range)
                    v = value_forward(value, sub)
                    vl, vstats = core.value_loss(v, old_values[rows], returns[rows], sub.mask, cfg.value_clip_range)
                    _check_finite(it, policy_loss=pl, value_loss=vl, policy_logits=logits)
                    (pl * weight).backward()
                    (vl * weight).backward()
                    stats["policy_loss"].append(pl.item())
                    stats["value_loss"].append(vl.item())
                    stats["entropy"].append(float(core.masked_mean(ent, sub.mask)))
                    stats["clip_frac"].append(pstats["clip_frac"])
                    stats["approx_kl"].append(pstats["approx_kl"])
                    stats["value_clip_frac"].append(vstats["value_clip_frac"])
                for model, opt in ((policy, opt_p), (value, opt_v)):
                    params = [p for p in model.parameters() if p.requires_grad]
                    _average_gradients(params)
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
            if cfg.target_kl is not None:
                approx_kl = float(_all_mean(torch.tensor(stats["approx_kl"], device=device).mean()))
                if approx_kl > cfg.target_kl:
                    stop = True
                    break
        t_optim = t_o.elapsed

        # --- metrics ------------------------------------------------------------------------------------------
        def g(t):  # global mean across ranks
            return float(_all_mean(t.float().mean().reshape(1)).item())

        seq_kl = kl.sum(1)
        metrics = {
            "iteration": it,
            "step": it,
            "rm_helpfulness": g(raw_h),
            "rm_safety": g(raw_s),
            "rm_helpfulness_prob": g(torch.sigmoid(raw_h)),
            "rm_safety_prob": g(torch.sigmoid(raw_s)),
            "reward_combined": g(rc),
            "reward_score": g(score),
            "kl_ref": g(seq_kl),
            **{k: g(torch.tensor(v, device=device)) for k, v in stats.items()},  # all ranks, not rank 0's
            "explained_variance": core.explained_variance(old_values, returns, batch.mask),
            "response_length": g(batch.mask.sum(1)),
            "no_eos_frac": g((~finished).float()),
            "early_stopped": stop,
            "time_rollout_s": round(t_rollout, 3),
            "time_scoring_s": round(t_scoring, 3),
            "time_optim_s": round(t_optim, 3),
            "time_iteration_s": round(t_it.elapsed, 3),
        }
        last_metrics = metrics
        if is_main_process():
            append_jsonl(out_dir / METRICS_FILE, metrics)
            if cfg.num_samples and (it % cfg.sample_every == 0 or it == cfg.iterations):
                samples_log += [{
                    "iteration": it,
                    "prompt": prompts[i].context_messages()[-1]["content"],
                    "response": tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip(),
                    "rm_helpfulness": round(float(raw_h[j]), 4),
                    "rm_safety": round(float(raw_s[j]), 4),
                    "reward_combined": round(float(rc[j]), 4),
                    "is_safety": is_safety[i],
                } for j, (i, r) in enumerate(zip(idx, responses)) if j < cfg.num_samples]
                atomic_write_json(out_dir / "samples.json", samples_log)
        if progress:
            progress({"stage": "ppo", "step": it, "total": cfg.iterations, "metrics": metrics,
                      "samples": [s for s in samples_log if s["iteration"] == it]})

        # --- checkpoint -----------------------------------------------------------------------------------
        if it % cfg.save_every == 0 and it < cfg.iterations:
            _save_checkpoint(out_dir, it, policy, value, opt_p, opt_v, sampler, order_rng, order, cursor,
                             tokenizer, policy_base, value_base, cfg)

    # --- final ----------------------------------------------------------------------------------------------
    artifacts: dict[str, str] = {}
    if is_main_process():
        save_model(policy, out_dir / FINAL_DIR, tokenizer, role="policy", base=policy_base if is_peft(policy) else None)
        save_model(value, out_dir / "value", tokenizer, role="value", base=value_base if is_peft(value) else None)
        logs = read_jsonl(out_dir / METRICS_FILE)
        from ..plots import plot_curves

        if plot_curves(logs, ["reward_combined", "kl_ref", "response_length"], out_dir / "curves.png",
                       title="PPO", x="iteration"):
            artifacts["curves"] = "curves.png"
        if samples_log:
            artifacts["samples"] = "samples.json"
        first = logs[: max(1, min(3, len(logs)))]
        final_metrics = {k: v for k, v in last_metrics.items() if k not in ("step",)}
        final_metrics["reward_combined_first"] = sum(r["reward_combined"] for r in first) / len(first)
        final_metrics["iterations"] = cfg.iterations
    else:
        final_metrics = last_metrics
    result = StageResult(
        stage="ppo",
        out_dir=str(out_dir),
        final=str(out_dir / FINAL_DIR),
        metrics=final_metrics,
        steps=cfg.iterations,
        duration_s=round(timer.elapsed, 2),
        artifacts=artifacts,
        config=cfg.model_dump(),
        inputs=input_fingerprints(inputs.model_dump()),
        provenance={**provenance(device), "resumed_from": str(resume) if resume else None},
    )
    if _dist() is not None:
        _dist().barrier()
    return write_result(result)


def _save_checkpoint(out_dir, it, policy, value, opt_p, opt_v, sampler, order_rng, order, cursor, tokenizer,
                     policy_base, value_base, cfg) -> None:
    rank, _ = _rank_world()
    state = {"opt_policy": opt_p.state_dict(), "opt_value": opt_v.state_dict(), "rng": _rng_state(sampler),
             "order_rng": order_rng.getstate(), "order": order, "cursor": cursor, "iteration": it}
    target = Path(out_dir) / f"checkpoint-{it}"
    staging = Path(out_dir) / STAGING_DIR / f"rank{rank}-{it}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, staging.with_suffix(".pt"))
    d = _dist()
    if d is not None:
        d.barrier()
    if is_main_process():
        with atomic_dir(target) as tmp:
            save_model(policy, tmp / "policy", tokenizer, role="policy", base=policy_base if is_peft(policy) else None)
            save_model(value, tmp / "value", tokenizer, role="value", base=value_base if is_peft(value) else None)
            for f in staging.parent.glob(f"rank*-{it}.pt"):
                r = f.name.split("-")[0]
                f.replace(tmp / f"state-{r}.pt")
        prune_checkpoints(out_dir, cfg.keep_checkpoints)
    if d is not None:
        d.barrier()
