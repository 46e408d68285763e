"""Uncertainty of an evaluation difference: a paired bootstrap over prompts, and the verdict it supports.

Two checkpoints answer the SAME prompts, so the difference of a metric between them is estimated on paired data: a
bootstrap resample draws prompts with replacement and takes BOTH checkpoints' answers to each drawn prompt, all of a
prompt's samples together (several samples per prompt are not independent draws of the prompt distribution). The
metric of a resample is the mean over every answer it holds (a rate, when the values are 0/1), so a prompt with more
answers weighs more, exactly as in the point estimate. The interval is the percentile interval of the resampled
differences. Everything is seeded (numpy's ``default_rng``) and vectorised: one matrix of how often each prompt was
drawn in each resample turns the whole bootstrap into two matrix-vector products.

Pure python and numpy; no torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["LOWER_IS_BETTER", "NO_DIRECTION", "VERDICT_BETTER", "VERDICT_NONE", "VERDICT_WORSE", "PromptValues",
           "paired_bootstrap", "per_prompt", "verdict"]

#: Metrics where a lower value is the better one (the rest: higher is better).
LOWER_IS_BETTER = frozenset({"violation_rate", "false_refusal_rate", "false_refusal_borderline",
                             "false_refusal_helpful", "malformed_rate", "loss_rate", "no_eos_frac"})
#: Metrics where neither direction is better.
NO_DIRECTION = frozenset({"tie_rate", "n_prompts"})

VERDICT_BETTER = "better"
VERDICT_WORSE = "worse"
VERDICT_NONE = "no significant change"

#: One prompt's values: a number, or a sequence of numbers (several samples of the same prompt).
PromptValues = float | Sequence[float]


def _sums_counts(values: Sequence[PromptValues], name: str) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = np.empty(len(values)), np.empty(len(values))
    for i, v in enumerate(values):
        arr = np.atleast_1d(np.asarray(v, dtype=float))
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{name}[{i}]: expected a number or a non-empty list of numbers, got {v!r}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}[{i}]: expected finite values, got {v!r}")
        sums[i], counts[i] = arr.sum(), arr.size
    return sums, counts


def paired_bootstrap(baseline: Sequence[PromptValues], candidate: Sequence[PromptValues], *,
                     resamples: int = 2000, seed: int = 0, confidence: float = 0.95,
                     relative: bool = False) -> dict:
    """The difference ``metric(candidate) - metric(baseline)`` with a paired bootstrap percentile interval.

    ``baseline[i]`` and ``candidate[i]`` are the two checkpoints' values on prompt ``i``: a number, or a list of
    numbers for several samples of the prompt (kept together in every resample). The metric is the mean of all
    values. With ``relative=True`` the difference is relative to the baseline, ``(c - b) / b`` (resamples whose
    baseline is 0 are dropped; None when all are).

    Returns ``{"estimate", "ci": [lo, hi], "baseline", "candidate", "n_prompts", "resamples", "confidence"}``.
    Deterministic for a seed; identical inputs give exactly ``[0.0, 0.0]``.
    """
    if len(baseline) != len(candidate):
        raise ValueError(f"paired bootstrap: baseline has {len(baseline)} prompts, candidate {len(candidate)}; "
                         "expected the same prompts for both")
    if len(baseline) == 0:
        raise ValueError("paired bootstrap: expected at least one prompt, got none")
    if resamples < 1:
        raise ValueError(f"paired bootstrap: resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired bootstrap: confidence must be in (0, 1), got {confidence}")
    sb, nb = _sums_counts(baseline, "baseline")
    sc, nc = _sums_counts(candidate, "candidate")
    n = len(sb)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    # weights[r, i]: how often prompt i was drawn in resample r
    weights = np.bincount((draws + n * np.arange(resamples)[:, None]).ravel(),
                          minlength=resamples * n).reshape(resamples, n).astype(float)
    mb, mc = (weights @ sb) / (weights @ nb), (weights @ sc) / (weights @ nc)
    point_b, point_c = sb.sum() / nb.sum(), sc.sum() / nc.sum()
    if relative:
        keep = mb != 0
        diffs = (mc[keep] - mb[keep]) / mb[keep]
        estimate = (point_c - point_b) / point_b if point_b != 0 else None
    else:
        diffs, estimate = mc - mb, point_c - point_b
    tail = (1 - confidence) / 2
    ci = [float(x) for x in np.quantile(diffs, [tail, 1 - tail])] if diffs.size else None
    return {"estimate": None if estimate is None else float(estimate), "ci": ci, "baseline": float(point_b),
            "candidate": float(point_c), "n_prompts": n, "resamples": resamples, "confidence": confidence}


def per_prompt(ids: Sequence[str], values: Sequence[float | bool | None]) -> dict[str, list[float]]:
    """Group per-answer values by prompt id (first-seen order); None values (not applicable) are left out, and so
    is a prompt with none left."""
    if len(ids) != len(values):
        raise ValueError(f"per_prompt: {len(ids)} ids but {len(values)} values")
    out: dict[str, list[float]] = {}
    for i, v in zip(ids, values):
        if v is not None:
            out.setdefault(i, []).append(float(v))
    return out


def verdict(metric: str, ci: Sequence[float] | None) -> str:
    """"better" / "worse" only when the interval of the difference (candidate - baseline) excludes 0, in the
    metric's own direction (lower is better for violation, false-refusal, malformed and no-EOS rates); otherwise
    "no significant change". An empty string for a metric with no direction (tie rate) or no interval."""
    if ci is None or metric in NO_DIRECTION:
        return ""
    lo, hi = ci
    if lo <= 0 <= hi:
        return VERDICT_NONE
    up = lo > 0
    return VERDICT_BETTER if up != (metric in LOWER_IS_BETTER) else VERDICT_WORSE
