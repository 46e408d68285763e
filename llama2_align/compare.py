"""Each stage added after RLHF against the policy it started from, on the evaluation's own answers.

The evaluation compares every checkpoint with its baseline (SFT). Context distillation and GAtt need another
question answered: what did the stage itself change? :func:`stage_pairs` says which checkpoint each added stage
started from, and :func:`compare_pairs` computes the paired-bootstrap intervals of (stage - before) on the headline
metrics from ``answers.json`` (the same prompts, the same seeded sampling), exactly as the evaluation computes its
intervals against the baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from .stages.evaluate import difference_intervals, pairwise_outcomes

#: Checkpoint names of the stages added after RLHF, and what they are.
ADDED_STAGES = {"cd": "context distillation", "cd-untargeted": "context distillation (untargeted)",
                "gatt": "Ghost Attention"}


#: The pipeline's checkpoints in the recipe's order (files such as answers.json keep their names sorted).
RECIPE_ORDER = ("sft", "rs", "ppo", "cd", "cd-untargeted", "gatt")


def stage_pairs(names: list[str]) -> dict[str, str]:
    """``{added stage checkpoint: the checkpoint it started from}`` for the evaluation's checkpoint names, taken in
    the recipe's order (the untargeted comparison starts from the same policy as context distillation)."""
    names = sorted(names, key=lambda n: RECIPE_ORDER.index(n) if n in RECIPE_ORDER else len(RECIPE_ORDER))
    policies = [n for n in names if n != "cd-untargeted"]
    pairs = {n: policies[policies.index(n) - 1] for n in ("cd", "gatt") if n in policies and policies.index(n) > 0}
    if "cd-untargeted" in names and "cd" in pairs:
        pairs["cd-untargeted"] = pairs["cd"]
    return pairs


def compare_pairs(answers: dict[str, list[dict]], pairs: dict[str, str], resamples: int = 2000, seed: int = 1234
                  ) -> dict[str, dict]:
    """``{stage: {"vs", "ci", "ci_relative"}}`` from the evaluation's answers (``answers.json``: per checkpoint,
    one judged row per answer, in the same order for every checkpoint)."""
    out = {}
    for cand, ref in pairs.items():
        base, other = answers[ref], answers[cand]
        records = [SimpleNamespace(id=r["id"], category=r["category"]) for r in base]
        outcomes = pairwise_outcomes([r["rm_helpfulness"] for r in base], [r["rm_helpfulness"] for r in other], 0.0,
                                     seed)
        ci, rel = difference_intervals(records, base, other, outcomes, resamples, seed)
        out[cand] = {"vs": ref, "ci": ci, "ci_relative": rel}
    return out


def compare_eval_dir(eval_dir: str | Path, resamples: int = 2000, seed: int = 1234) -> dict[str, dict]:
    """:func:`compare_pairs` for a finished evaluation directory (empty when no stage was added after RLHF)."""
    path = Path(eval_dir) / "answers.json"
    if not path.exists():
        return {}
    answers = json.loads(path.read_text())
    pairs = stage_pairs(list(answers))
    return compare_pairs(answers, pairs, resamples, seed) if pairs else {}
