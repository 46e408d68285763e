"""Collect: pairs of answers from the current policy to a round's fresh prompts, for annotation (Llama 2, §3.2.1).

The paper's annotators compared two answers to the same prompt "sampled from two different model variants, and
varying the temperature hyper-parameter". For each prompt this stage samples ``samples_per_prompt`` answers, half
from variant A (the policy at ``temperatures[0]``) and half from variant B (``inputs.policy_b``, or the same policy,
at ``temperatures[1]``), and pairs them A_i with B_i, each pair shown in a random order (``response_a`` is not
always variant A: an annotator with a position bias cannot favour one variant). A pair whose two answers are the
same text, or where one is empty, is dropped: the preference contract refuses it, and there is nothing to choose.

Stage directory: ``pairs.jsonl`` (per pair: ``id``, ``prompt`` or ``messages``, ``response_a``/``response_b``,
``finished_a``/``finished_b``, ``variant_a``/``variant_b``, ``is_safety``, ``category``), ``samples.json`` (a few
pairs for the UI), ``result.json`` (last).
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from .. import dist
from ..data import read_records, write_jsonl
from ..io import atomic_write_json
from ..tokenizer import load_tokenizer
from .common import StageOutput, StageRun, stage

PAIRS_FILE = "pairs.jsonl"


class CollectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples_per_prompt: int = Field(2, ge=2, description="answers per prompt, half from each variant (pairs: half)")
    temperatures: tuple[float, float] = Field((0.8, 1.2), description="variant A's and variant B's temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    max_prompts: int | None = Field(None, ge=1, description="the first N prompts of the file (None: all)")
    generation_batch_size: int = Field(64, ge=1)
    num_samples: int = Field(6, ge=0, description="pairs written to samples.json")
    dtype: str = "auto"
    seed: int = 0


class CollectInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str  # variant A (and B unless policy_b is set)
    prompts: str  # the round's prompts (kind "prompts")
    policy_b: str | None = None  # variant B: another checkpoint (the paper's "two model variants")


def _sample(path: str, contexts: list[list[dict]], temperature: float, config: CollectConfig, seed: int):
    from ..generation import GenerationSettings, generate
    from ..model import build_model, freeze

    policy = freeze(build_model(path, "policy", dtype=config.dtype, seed=seed))
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=temperature, top_p=config.top_p,
                                  batch_size=config.generation_batch_size, seed=seed)
    return generate(policy, load_tokenizer(path), contexts, settings)


def make_pairs(records: list, a, b, per_variant: int, seed: int) -> tuple[list[dict], dict]:
    """Pair variant A's i-th answer to a prompt with variant B's i-th (``a``/``b``: Generations, prompt-major); the
    order within a pair is random. Returns the pairs and what was dropped."""
    rng = random.Random(f"collect-order:{seed}")
    pairs, dropped = [], {"identical": 0, "empty": 0}
    for p, rec in enumerate(records):
        for i in range(per_variant):
            j = p * per_variant + i
            sides = [("a", a.texts[j].strip(), a.finished[j]), ("b", b.texts[j].strip(), b.finished[j])]
            if not sides[0][1] or not sides[1][1]:
                dropped["empty"] += 1
                continue
            if sides[0][1] == sides[1][1]:
                dropped["identical"] += 1
                continue
            if rng.random() < 0.5:
                sides.reverse()
            context = {"prompt": rec.prompt} if rec.prompt is not None else {"messages": rec.context_messages()}
            pairs.append({"id": f"{rec.id or p}-pair{i + 1}", **context, "is_safety": rec.is_safety,
                          "category": rec.category, "response_a": sides[0][1], "response_b": sides[1][1],
                          "finished_a": sides[0][2], "finished_b": sides[1][2], "variant_a": sides[0][0],
                          "variant_b": sides[1][0]})
    return pairs, dropped


@stage("collect")
def run_collect(config: CollectConfig, inputs: CollectInputs, run: StageRun) -> StageOutput:
    """Sample two variants' answers to every prompt and pair them up for annotation."""
    records = read_records(inputs.prompts, "prompts")[: config.max_prompts]
    per_variant = config.samples_per_prompt // 2
    contexts = [r.context_messages() for r in records for _ in range(per_variant)]
    a = _sample(inputs.policy, contexts, config.temperatures[0], config, config.seed)
    run.report(1, 2, {"variant": "a"})
    b = _sample(inputs.policy_b or inputs.policy, contexts, config.temperatures[1], config, config.seed + 1)
    run.report(2, 2, {"variant": "b"})
    pairs, dropped = make_pairs(records, a, b, per_variant, config.seed)
    metrics = {"prompts": len(records), "pairs": len(pairs), "dropped_identical": dropped["identical"],
               "dropped_empty": dropped["empty"], "pairs_safety": sum(p["is_safety"] for p in pairs),
               "eos_frac_a": round(sum(a.finished) / max(1, len(a.finished)), 4),
               "eos_frac_b": round(sum(b.finished) / max(1, len(b.finished)), 4),
               "policy_b": inputs.policy_b is not None}
    artifacts = {}
    if dist.is_main():
        write_jsonl(pairs, run.out_dir / PAIRS_FILE)
        atomic_write_json(run.out_dir / "samples.json", [
            {k: p.get(k) for k in ("prompt", "response_a", "response_b", "variant_a")}
            for p in pairs[: config.num_samples]])
        artifacts = {"pairs": PAIRS_FILE, "samples": "samples.json"}
    return StageOutput(final=None, metrics=metrics, steps=2, artifacts=artifacts)
