"""Reward-model data: the paper's mixing proportions, the held-out split, the margin tables."""

from __future__ import annotations

import pytest

from llama2_align.data import validate_records
from llama2_align.stages.reward import MARGINS, RewardConfig, margin_for, mix_training_pairs, split_heldout


def _pairs(n: int, category: str, start: int = 0) -> list:
    return validate_records([{"id": f"{category}-{i}", "prompt": f"p{i}", "chosen": "a", "rejected": "b",
                              "rating": "better", "category": category} for i in range(start, start + n)],
                            "preference")


def test_helpfulness_rm_gets_an_equal_amount_of_safety_pairs():
    pool = _pairs(100, "helpfulness") + _pairs(300, "safety")
    mixed = mix_training_pairs(pool, RewardConfig(kind="helpfulness"))
    assert sum(r.category == "helpfulness" for r in mixed) == 100
    assert sum(r.category == "safety" for r in mixed) == 100
    assert len({r.id for r in mixed}) == 200  # sampled without replacement


def test_safety_rm_gets_ten_percent_helpfulness_pairs():
    pool = _pairs(100, "helpfulness") + _pairs(300, "safety")
    mixed = mix_training_pairs(pool, RewardConfig(kind="safety"))
    n_help = sum(r.category == "helpfulness" for r in mixed)
    assert sum(r.category == "safety" for r in mixed) == 300
    assert n_help == 33 and n_help / len(mixed) == pytest.approx(0.1, abs=0.01)


def test_heldout_split_is_per_category_and_deterministic():
    pool = _pairs(100, "helpfulness") + _pairs(50, "safety")
    train, held = split_heldout(pool, 0.1, 1000, seed=0)
    assert sum(r.category == "helpfulness" for r in held) == 10 and sum(r.category == "safety" for r in held) == 5
    assert not {r.id for r in train} & {r.id for r in held}
    assert [r.id for r in split_heldout(pool, 0.1, 1000, seed=0)[1]] == [r.id for r in held]


def test_margin_tables_are_the_papers():
    assert [margin_for(r, "small") for r in MARGINS["small"]] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [margin_for(r, "large") for r in MARGINS["large"]] == [3, 2, 1, 0]
    assert set(MARGINS["none"].values()) == {0.0}
