"""The simulated annotator: the demo world's own preference process, applied to two answers of a policy.

Iterative RLHF rounds (``llama2_align.rounds``) ask people to compare two fresh answers to each prompt. On the demo
world this module stands in for them, and it is the only part of a round that looks at the oracle
(``demo_world.judge``); reward models, the policy and the gates see only the labels it writes.

* **Which answer is better.** The oracle grades each answer. Helpful and borderline prompts: correct (2) > wrong (1)
  > refusal (0). Adversarial prompts: a refusal (2) > a violation (0); the pair is a safety pair and carries the
  safety flags (``chosen_safe``/``rejected_safe``: not a violation). A malformed answer (cut off, broken words; see
  ``demo_world.malformed_reason``) loses half a grade. Equal grades on a helpfulness pair: the fuller answer (more
  words), as the world's annotators prefer between two correct paraphrases (``demo_world._fullness``); equal grades
  and lengths, and equal grades on a safety pair (two refusals, as in the world's data), are a coin flip.
* **The rating** says how far apart the grades are (:data:`RATING_BY_GAP`): 2 or more significantly better (correct
  vs refusal, refusal vs violation), 1 better (correct vs wrong), 0.5 slightly better (only one is malformed), 0
  negligibly better (the same judgement).
* **Noise.** The label is flipped at the world's own rates by rating (``HELPFULNESS_FLIP_RATE`` for helpfulness
  pairs, ``SAFETY_FLIP_RATE`` for safety pairs), as in the world's preference data; a flip swaps the safety flags
  too.

Pairs are plain dicts as the collect stage writes them: ``{"id", "prompt" | "messages", "response_a",
"response_b", "finished_a", "finished_b"}``; the prompt must be a demo-world prompt (the annotator looks its oracle
data up by the prompt's text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import demo_world as world
from .errors import InputError

#: The rating for a gap between the two answers' grades (largest gap first).
RATING_BY_GAP: tuple[tuple[float, str], ...] = (
    (2.0, "significantly_better"), (1.0, "better"), (0.5, "slightly_better"), (0.0, "negligibly_better"))
MALFORMED_PENALTY = 0.5


@dataclass(frozen=True)
class Note:
    """What the annotator knows about one label and the reward models must not: the grades and whether the label
    was flipped (for the flip-rate checks and the round's annotation summary)."""

    grades: tuple[float, float]  # of (chosen, rejected) as written
    flipped: bool
    category: str  # helpfulness | safety


def grade(description: dict, response: str, finished: bool = True) -> tuple[float, bool]:
    """``(grade, violation)`` of one answer to a demo-world prompt (``description``: ``demo_world.describe_prompt``)."""
    j = world.judge(description, response, finished=finished)
    if description["category"] == "adversarial":
        g = 0.0 if j.violation else 2.0
    else:
        g = 2.0 if j.correct else (0.0 if j.refusal else 1.0)
    return g - (MALFORMED_PENALTY if j.malformed else 0.0), j.violation


def rating_for(gap: float) -> str:
    gap = abs(gap)
    return next(r for threshold, r in RATING_BY_GAP if gap >= threshold - 1e-9)


def _prompt_text(pair: dict) -> str:
    if pair.get("prompt"):
        return pair["prompt"]
    users = [m["content"] for m in pair.get("messages") or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def _tie_prefers_a(a: str, b: str, category: str, rng: random.Random) -> bool:
    """Two answers the oracle grades the same: on a helpfulness pair the fuller one wins (more words: the world's
    mild preference between correct paraphrases); otherwise a coin flip. The coin is drawn either way, so the labels
    after it do not depend on which rule decided."""
    coin = rng.random() < 0.5
    if category == "helpfulness":
        na, nb = len(a.split()), len(b.split())
        if na != nb:
            return na > nb
    return coin


def annotate_pair(pair: dict, rng: random.Random) -> tuple[dict, Note] | None:
    """One preference record (native format) for a pair, and its note; None when the two answers are the same text
    or one is empty (the preference contract refuses such a pair)."""
    a, b = pair["response_a"].strip(), pair["response_b"].strip()
    if not a or not b or a == b:
        return None
    text = _prompt_text(pair)
    desc = world.describe_prompt(text)
    if desc is None:
        raise InputError(f"pair {pair.get('id')!r}: {text!r} is not a demo-world prompt; the simulated annotator "
                         "labels only the demo world's pairs (use annotator 'human' on other data)")
    (ga, va), (gb, vb) = grade(desc, a, pair.get("finished_a", True)), grade(desc, b, pair.get("finished_b", True))
    category = "safety" if desc["category"] == "adversarial" else "helpfulness"
    a_first = ga > gb or (ga == gb and _tie_prefers_a(a, b, category, rng))
    (chosen, gc, vc), (rejected, gr, vr) = ((a, ga, va), (b, gb, vb)) if a_first else ((b, gb, vb), (a, ga, va))
    rating = rating_for(gc - gr)
    flip_rate = (world.SAFETY_FLIP_RATE if category == "safety" else world.HELPFULNESS_FLIP_RATE)[rating]
    flipped = rng.random() < flip_rate
    if flipped:
        chosen, rejected, gc, gr, vc, vr = rejected, chosen, gr, gc, vr, vc
    safe = category == "safety"
    record = {"id": pair.get("id"), "prompt": text, "chosen": chosen, "rejected": rejected, "rating": rating,
              "category": category, "chosen_safe": (not vc) if safe else None,
              "rejected_safe": (not vr) if safe else None, "harm_category": desc.get("harm_category")}
    if pair.get("messages"):
        record.pop("prompt")
        record["messages"] = pair["messages"]
    return record, Note((gc, gr), flipped, category)


def annotate(pairs: list[dict], seed: int = 0) -> tuple[list[dict], list[Note]]:
    """Label every pair (seeded: the same pairs and seed give the same labels). Returns the preference records and
    their notes, in the pairs' order; pairs with identical or empty answers are left out of both."""
    rng = random.Random(f"llama2-align-demo-annotator:{seed}")
    records, notes = [], []
    for pair in pairs:
        out = annotate_pair(pair, rng)
        if out is not None:
            records.append(out[0])
            notes.append(out[1])
    return records, notes


def summarize_notes(records: list[dict], notes: list[Note]) -> dict:
    """Counts for the round's annotation summary: pairs by category and rating, flipped labels, the share of pairs
    whose two answers the oracle grades the same."""
    by: dict[str, dict[str, int]] = {}
    for r in records:
        by.setdefault(r["category"], {}).setdefault(r["rating"], 0)
        by[r["category"]][r["rating"]] += 1
    n = len(notes)
    return {"pairs": n, "by_category_rating": by, "flipped": sum(x.flipped for x in notes),
            "same_grade": sum(x.grades[0] == x.grades[1] for x in notes),
            "chosen_is_better": sum(x.grades[0] > x.grades[1] for x in notes)}
