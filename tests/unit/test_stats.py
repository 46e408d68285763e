"""The paired bootstrap over prompts: known answers, coverage on simulated data, determinism, speed, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from llama2_align.stats import VERDICT_BETTER, VERDICT_NONE, VERDICT_WORSE, paired_bootstrap, per_prompt, verdict


def test_identical_answers_give_a_zero_interval():
    rng = np.random.default_rng(1)
    values = [list(rng.integers(0, 2, size=4).astype(float)) for _ in range(300)]
    r = paired_bootstrap(values, values, resamples=2000, seed=3)
    assert r["estimate"] == 0.0 and r["ci"] == [0.0, 0.0]
    scores = list(rng.normal(size=300))  # one real-valued sample per prompt
    assert paired_bootstrap(scores, scores)["ci"] == [0.0, 0.0]


def test_point_estimate_is_the_mean_over_all_answers():
    base = [[1, 0], [0, 0], [1]]          # 2 of 5 answers
    cand = [[1, 1], [1, 0], [1]]          # 4 of 5 answers
    r = paired_bootstrap(base, cand, resamples=50)
    assert r["baseline"] == pytest.approx(0.4) and r["candidate"] == pytest.approx(0.8)
    assert r["estimate"] == pytest.approx(0.4) and r["n_prompts"] == 3
    rel = paired_bootstrap(base, cand, resamples=50, relative=True)
    assert rel["estimate"] == pytest.approx(1.0)


def test_a_constant_shift_is_recovered_exactly():
    rng = np.random.default_rng(0)
    base = rng.normal(size=200)
    r = paired_bootstrap(list(base), list(base + 0.25), resamples=500)
    assert r["ci"] == pytest.approx([0.25, 0.25])


def test_coverage_on_a_known_distribution():
    """Paired 0/1 outcomes, 4 samples per prompt with a per-prompt difficulty (samples of a prompt correlate):
    the 95% interval must cover the true difference in about 95% of simulated data sets."""
    rng = np.random.default_rng(12345)
    n_prompts, k, datasets = 300, 4, 400
    true_diff = 0.08
    covered = 0
    for d in range(datasets):
        difficulty = rng.uniform(0.1, 0.7, size=n_prompts)  # P(correct) of the baseline on this prompt
        pb = np.repeat(difficulty[:, None], k, axis=1)
        pc = pb + true_diff
        base = (rng.random((n_prompts, k)) < pb).astype(float)
        cand = (rng.random((n_prompts, k)) < pc).astype(float)
        r = paired_bootstrap(list(base), list(cand), resamples=1000, seed=d)
        # the true difference of the population means: E[pc - pb] = true_diff exactly
        covered += r["ci"][0] <= true_diff <= r["ci"][1]
    coverage = covered / datasets
    assert 0.91 <= coverage <= 0.985, coverage  # binomial sd at 400 sets: 0.011


def test_seeded_and_deterministic():
    rng = np.random.default_rng(7)
    base = list((rng.random((300, 4)) < 0.4).astype(float))
    cand = list((rng.random((300, 4)) < 0.5).astype(float))
    a = paired_bootstrap(base, cand, resamples=5000, seed=11)
    b = paired_bootstrap(base, cand, resamples=5000, seed=11)
    assert a == b
    assert paired_bootstrap(base, cand, resamples=5000, seed=12)["ci"] != a["ci"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError, match=r"candidate\[1\]"):
        paired_bootstrap([1, 0], [1, []])
    with pytest.raises(ValueError, match="at least one prompt"):
        paired_bootstrap([], [])


def test_per_prompt_groups_samples_and_drops_not_applicable():
    groups = per_prompt(["a", "a", "b", "b", "c"], [True, False, None, None, 1.0])
    assert groups == {"a": [1.0, 0.0], "c": [1.0]}


def test_verdict_wording():
    assert verdict("helpfulness_accuracy", [0.02, 0.09]) == VERDICT_BETTER == "better"
    assert verdict("helpfulness_accuracy", [-0.09, -0.01]) == VERDICT_WORSE == "worse"
    assert verdict("helpfulness_accuracy", [-0.01, 0.04]) == VERDICT_NONE == "no significant change"
    assert verdict("helpfulness_accuracy", [0.0, 0.0]) == "no significant change"
    # lower is better for rates of bad things
    for metric in ("violation_rate", "false_refusal_rate", "false_refusal_borderline", "malformed_rate"):
        assert verdict(metric, [-0.2, -0.1]) == "better"
        assert verdict(metric, [0.01, 0.03]) == "worse"
        assert verdict(metric, [-0.01, 0.03]) == "no significant change"
    assert verdict("tie_rate", [0.1, 0.2]) == "" and verdict("rm_safety", None) == ""
