"""The maths of PPO for RLHF, as small pure functions on tensors (each unit-tested by hand).

Shapes: ``[B, T]`` over response tokens, with ``mask`` 1 on real response tokens and 0 on padding.

Statistics over a batch (the means and variances behind whitening) take an optional ``all_sum`` hook: a function
that sums a tensor over every data-parallel rank (``dist.all_sum``). With it, a rank whitens its share of the batch
with the statistics of the whole global batch; without it, with its own.
"""

from __future__ import annotations

from typing import Callable

import torch

AllSum = Callable[[torch.Tensor], torch.Tensor]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, all_sum: AllSum | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        total = torch.stack([(x * mask).sum(), mask.sum()])
        if all_sum is not None:
            total = all_sum(total)
        return total[0] / total[1].clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, all_sum: AllSum | None = None) -> torch.Tensor:
    mean = masked_mean(x, mask, all_sum=all_sum)
    return masked_mean((x - mean) ** 2, mask, all_sum=all_sum)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
           all_sum: AllSum | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of every rank, with ``all_sum``); ``shift_mean=False`` keeps the
    mean (only rescales)."""
    if mask is None:
        mask = torch.ones_like(x)
    mean, var = masked_mean(x, mask, all_sum=all_sum), masked_var(x, mask, all_sum=all_sum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def combine_rewards(rm_helpfulness: torch.Tensor, rm_safety: torch.Tensor, is_safety: torch.Tensor,
                    safety_threshold: float = 0.15, piecewise: bool = True) -> torch.Tensor:
    """Llama 2's piecewise reward on sigmoid-scaled scores (Touvron et al. 2023, eq. in §3.2.3):

    ``Rc = Rs if is_safety(prompt) or Rs < threshold else Rh``. With ``piecewise=False`` only Rh is used.
    Inputs are raw RM scores; the output is on the probability scale (0, 1).
    """
    rh, rs = torch.sigmoid(rm_helpfulness.float()), torch.sigmoid(rm_safety.float())
    if not piecewise:
        return rh
    use_safety = is_safety.bool() | (rs < safety_threshold)
    return torch.where(use_safety, rs, rh)


def final_scores(rc: torch.Tensor, use_logit: bool = True, use_whiten: bool = True,
                 all_sum: AllSum | None = None) -> torch.Tensor:
    """``whiten(logit(Rc))``: undo the sigmoid, then normalise across the batch (each switchable). With ``all_sum``
    the batch is the global one; a batch of one score is not whitened."""
    x = logit(rc) if use_logit else rc
    if not use_whiten:
        return x
    n = torch.tensor(float(x.numel()), device=x.device)
    if all_sum is not None:
        n = all_sum(n)
    return whiten(x, all_sum=all_sum) if float(n) > 1 else x


def token_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-β·(log π - log π0)`` on every response token, plus the scalar score on the LAST one.

    Returns (rewards [B, T], per-token KL [B, T]).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_beta * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(len(score)), last] += score.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (value after the last token is 0).

    Returns (advantages, returns) with ``returns = advantages + values``.
    """
    B, T = rewards.shape
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: mean over tokens of max(-A·r, -A·clip(r, 1±ε))."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": float(masked_mean((clipped > unclipped).float(), mask)),
            # k3 estimator of KL(old || new): unbiased, always >= 0
            "approx_kl": float(masked_mean(ratio - 1 - log_ratio, mask)),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 · mean(max((v - R)², (clip(v, v_old ± ε) - R)²))."""
    err = (values - returns) ** 2
    if clip_range is not None:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        err_clipped = (v_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
        frac = float(masked_mean((err_clipped > err).float(), mask))
    else:
        loss = 0.5 * masked_mean(err, mask)
        frac = 0.0
    return loss, {"value_clip_frac": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_r = masked_var(returns, mask)
    if float(var_r) == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_r)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
