"""The demo world's round prompts and the simulated annotator (its labels, ratings and flip rates)."""

from __future__ import annotations

import math
import random

import pytest

from llama2_align import demo_annotator as ann
from llama2_align import demo_world as world
from llama2_align.data import validate_records


@pytest.mark.parametrize("sizes", [world.DemoSizes(), world.DemoSizes.micro()])
def test_round_prompts_come_from_the_training_split_only(sizes):
    held_out = {r["prompt"] for r in world.generate_demo_world(0, sizes).eval_prompts}
    first = world.round_prompts(1, 3000, seed=0, sizes=sizes)
    assert not {r["prompt"] for r in first} & held_out
    validate_records(first, "prompts")
    assert first == world.round_prompts(1, 3000, seed=0, sizes=sizes)  # deterministic
    assert [r["prompt"] for r in world.round_prompts(2, 50, 0, sizes)] != [r["prompt"] for r in first[:50]]
    share = sum(r["is_safety"] for r in first) / len(first)
    assert abs(share - world.PPO_MIX["adversarial"]) < 0.04
    assert all(r["is_safety"] == (r["category"] == "adversarial") for r in first)


def _pair(text: str, a: str, b: str, fa: bool = True, fb: bool = True) -> dict:
    return {"id": "p", "prompt": text, "response_a": a, "response_b": b, "finished_a": fa, "finished_b": fb}


def _prompts(category: str, n: int) -> list:
    index = world._prompt_index()
    return [index[r["prompt"]] for r in world.round_prompts(7, 6 * n) if r["category"] == category][:n]


def test_the_oracle_decides_and_the_rating_says_how_far_apart():
    rng = random.Random(0)
    helpful = next(p for p in _prompts("helpful", 50) if p.task == "legs")
    right, wrong = world._correct_answers(helpful)[0], world._wrong_answer(helpful, rng)[0]
    refusal = world.REFUSALS[0]
    rec, note = ann.annotate_pair(_pair(helpful.text, wrong, right), random.Random(1))
    assert (rec["chosen"], rec["rating"], rec["category"]) == (right, "better", "helpfulness") or note.flipped
    rec, note = ann.annotate_pair(_pair(helpful.text, refusal, right), random.Random(1))
    assert rec["rating"] == "significantly_better" and rec["chosen_safe"] is None
    assert ann.annotate_pair(_pair(helpful.text, right, right + " "), random.Random(1)) is None  # the same text
    adversarial = _prompts("adversarial", 1)[0]
    comply = world._compliance(adversarial, rng)
    rec, note = ann.annotate_pair(_pair(adversarial.text, comply, refusal), random.Random(1))
    assert rec["category"] == "safety" and rec["rating"] == "significantly_better"
    assert (rec["chosen"], rec["chosen_safe"], rec["rejected_safe"]) in ((refusal, True, False),
                                                                          (comply, False, True))
    rec, note = ann.annotate_pair(_pair(adversarial.text, refusal, world.REFUSALS[1]), random.Random(1))
    assert rec["rating"] == "negligibly_better" and rec["chosen_safe"] and rec["rejected_safe"]
    rec, note = ann.annotate_pair(_pair(adversarial.text, refusal, world.REFUSALS[1], fb=False), random.Random(1))
    assert rec["rating"] == "slightly_better"  # the cut-off refusal loses half a grade
    validate_records([rec], "preference")
    with pytest.raises(ann.InputError, match="not a demo-world prompt"):
        ann.annotate_pair(_pair("What is the capital of France?", "Paris.", "Rome."), random.Random(0))


def test_label_flip_rates_match_the_worlds_constants():
    """Many pairs of every rating: the share of labels that prefer the oracle's worse answer is the world's flip rate
    for that category and rating (for equal grades, where the oracle prefers neither, the annotator's note says)."""
    rng = random.Random(3)
    pairs: list[dict] = []
    for p in _prompts("helpful", 1500):
        right = world._correct_answers(p)
        others = [r for r in right if r.strip() != right[0].strip()]
        pairs += [_pair(p.text, right[0], world._wrong_answer(p, rng)[0]), _pair(p.text, right[0], world.REFUSALS[0])]
        if others:  # two correct answers; then one of them cut off (half a grade apart)
            pairs += [_pair(p.text, right[0], others[0]), _pair(p.text, right[0], others[0], fb=False)]
    for p in _prompts("adversarial", 1500):
        pairs += [_pair(p.text, world.REFUSALS[0], world._compliance(p, rng)),
                  _pair(p.text, world.REFUSALS[0], world.REFUSALS[1]),
                  _pair(p.text, world.REFUSALS[0], world.REFUSALS[1], fb=False)]
    records, notes = ann.annotate(pairs, seed=11)
    validate_records(records, "preference")
    cells: dict[tuple[str, str], list[bool]] = {}
    for rec, note in zip(records, notes):
        worse_chosen = note.grades[0] < note.grades[1]
        cells.setdefault((rec["category"], rec["rating"]), []).append(
            note.flipped if rec["rating"] == "negligibly_better" else worse_chosen)
        if rec["rating"] != "negligibly_better":
            assert worse_chosen == note.flipped
    rates = {"helpfulness": world.HELPFULNESS_FLIP_RATE, "safety": world.SAFETY_FLIP_RATE}
    checked = 0
    for (category, rating), flips in cells.items():
        expected, n = rates[category][rating], len(flips)
        if n < 800:
            continue
        se = math.sqrt(expected * (1 - expected) / n)
        assert abs(sum(flips) / n - expected) < 4.5 * se + 0.002, (category, rating, n, sum(flips) / n, expected)
        checked += 1
    assert checked == 7, sorted((k, len(v)) for k, v in cells.items())
    assert ann.annotate(pairs, seed=11)[0] == records  # seeded


def test_summary_counts():
    p = _prompts("helpful", 1)[0]
    right = world._correct_answers(p)[0]
    records, notes = ann.annotate([_pair(p.text, right, world.REFUSALS[0])], seed=0)
    s = ann.summarize_notes(records, notes)
    assert s["pairs"] == 1 and s["same_grade"] == 0
    assert s["by_category_rating"] == {"helpfulness": {"significantly_better": 1}}


def test_equal_grades_follow_the_worlds_own_tie_break():
    """Two correct answers: the fuller one is chosen (the world's annotators' mild preference between paraphrases),
    unless the label is flipped; two refusals of an adversarial prompt stay a coin flip."""
    pairs, longer = [], []
    for p in _prompts("helpful", 600):
        right = sorted({r.strip() for r in world._correct_answers(p)}, key=lambda r: len(r.split()))
        if len(right[0].split()) < len(right[-1].split()):
            pairs.append(_pair(p.text, right[0], right[-1]))
            longer.append(right[-1])
    records, notes = ann.annotate(pairs, seed=5)
    assert len(records) == len(pairs) > 300
    for rec, note, full in zip(records, notes, longer):
        assert rec["rating"] == "negligibly_better"
        assert (rec["chosen"] == full) != note.flipped
    assert 0.08 < sum(n.flipped for n in notes) / len(notes) < 0.22  # HELPFULNESS_FLIP_RATE: 0.15
    adversarial = _prompts("adversarial", 400)
    records, _ = ann.annotate([_pair(p.text, world.REFUSALS[0], world.REFUSALS[1] + " Sorry.") for p in adversarial],
                              seed=5)
    share = sum(r["chosen"] == world.REFUSALS[0] for r in records) / len(records)
    assert 0.4 < share < 0.6
