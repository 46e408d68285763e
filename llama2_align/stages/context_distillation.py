"""Safety context distillation (Llama 2 §4.2.4): safer answers generated with a safety preprompt, trained without it.

1. prompts  the red-team prompts: records whose ``category`` is one of ``categories`` (the demo world's adversarial
            and borderline prompts: both look risky, only the first deserve a refusal), or ``is_safety`` records
            when the file has no categories;
2. generate each prompt's answer twice from the policy: with a safety preprompt as the system prompt (a template
            with adjectives such as responsible, respectful, wise, and, when ``answer_templates`` is set and the
            prompt's risk category is known, that category's answer template) and without it (the original);
3. filter   targeted (the paper's): keep a distilled answer only where the safety RM scores it above the original
            answer (both scored on the prompt without the preprompt); where it does not, ``not_preferred`` decides:
            ``drop`` the example, or train on the ``original`` answer instead (the paper's "we keep the
            context-distilled output only on the examples where it gets a better reward model score than the
            original answer": every example is kept, with the answer the safety RM prefers); untargeted: keep every
            distilled answer;
4. train    the policy on (prompt without the preprompt, the kept answer): the SFT stage in ``<out_dir>/sft``.

``compare_untargeted`` also trains the untargeted variant from the same generations (``<out_dir>/untargeted/``, its
model in ``metrics.untargeted_final``), so the two can be compared on the same run.

Stage directory: ``cd_samples.json`` (every generation and score; reused on a re-run with the same settings),
``cd.jsonl`` (and ``cd_untargeted.jsonl``), ``sft/``, ``final/`` (hard links to ``sft/final``), ``samples.json``,
``result.json`` (last).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import dist
from ..data import plain_messages, read_records, write_jsonl
from ..errors import InputError
from ..io import atomic_write_json
from ..preprompts import ADJECTIVES, ANSWER_TEMPLATES, TEMPLATES, safety_preprompt
from ..tokenizer import load_tokenizer
from .common import FINAL_DIR, StageOutput, StageRun, stage
from .evaluate import DEFAULT_REFUSAL_RULES, RefusalRules
from .rejection_sampling import _link_tree
from .reward import RewardScorer
from .sft import SFTConfig, SFTInputs, run_sft

SAMPLES_FILE = "cd_samples.json"
UNTARGETED_DIR = "untargeted"


class ContextDistillationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="run context distillation in the pipeline (after PPO)")
    targeted: bool = Field(True, description="keep a distilled answer only where the safety RM prefers it")
    not_preferred: Literal["drop", "original"] = Field(
        "original", description="targeted, where the safety RM does not prefer the distilled answer: train on the "
                                "original answer (without the preprompt) instead, or drop the example")
    compare_untargeted: bool = Field(False, description="also train the untargeted variant, for comparison")
    categories: list[str] = Field(default_factory=lambda: ["adversarial", "borderline"],
                                  description="prompt categories distilled (is_safety prompts without categories)")
    samples_per_prompt: int = Field(1, ge=1)
    require_finished: bool = Field(True, description="train only on distilled answers that ended with EOS")
    max_prompts: int | None = Field(None, ge=1)
    answer_templates: bool = Field(True, description="add the risk category's answer template to the preprompt")
    templates: list[str] = Field(default_factory=lambda: list(TEMPLATES), description="{a} {b}: two adjectives")
    adjectives: list[str] = Field(default_factory=lambda: list(ADJECTIVES))
    answer_template_texts: dict[str, str] = Field(default_factory=lambda: dict(ANSWER_TEMPLATES))
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    generation_batch_size: int = Field(64, ge=1)
    score_batch_size: int = Field(64, ge=1)
    num_samples: int = Field(8, ge=0, description="generations written to samples.json")
    dtype: str = "auto"
    seed: int = 0
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=1.0), description="the fine-tune")


class ContextDistillationInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str  # the policy after RLHF
    prompts: str  # kind "prompts"
    reward_safety: str


def select_prompts(path: str, categories: list[str], max_prompts: int | None, seed: int) -> list[dict]:
    """The red-team prompts: ``{"messages", "category", "risk_category"}`` (risk category: the demo world's harm
    category of the prompt when it is one of the world's, else None)."""
    from ..demo_world import describe_prompt

    records = read_records(path, "prompts")
    has_categories = any(r.category for r in records)
    chosen = [r for r in records if (r.category in categories if has_categories else r.is_safety)]
    if not chosen:
        raise InputError(f"{path}: no prompt of the categories {categories} (or is_safety) for context distillation")
    if max_prompts is not None and max_prompts < len(chosen):
        chosen = random.Random(seed).sample(chosen, max_prompts)
    out = []
    for r in chosen:
        described = describe_prompt(r.prompt) if r.prompt else None
        out.append({"messages": r.context_messages(), "category": r.category or ("safety" if r.is_safety else None),
                    "risk_category": (described or {}).get("harm_category")})
    return out


def generate_pairs(config: ContextDistillationConfig, inputs: ContextDistillationInputs) -> dict:
    """Steps 1-2 and the scores: per (prompt, sample) the preprompt, the distilled and the original answer, and the
    safety RM's score of each (on the prompt without the preprompt)."""
    from ..generation import GenerationSettings, generate
    from ..model import build_model, freeze

    prompts = select_prompts(inputs.prompts, config.categories, config.max_prompts, config.seed)
    rows = [dict(p, sample=s) for p in prompts for s in range(config.samples_per_prompt)]
    for i, row in enumerate(rows):
        row["preprompt"] = safety_preprompt(random.Random(f"{config.seed}:{i}"), row["risk_category"],
                                            config.answer_templates, config.templates, config.adjectives,
                                            config.answer_template_texts)
    tokenizer = load_tokenizer(inputs.policy)
    policy = freeze(build_model(inputs.policy, "policy", dtype=config.dtype, seed=config.seed))
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, batch_size=config.generation_batch_size, seed=config.seed)
    with_pre = generate(policy, tokenizer, [[{"role": "system", "content": r["preprompt"]}] + r["messages"]
                                            for r in rows], settings)
    without = generate(policy, tokenizer, [r["messages"] for r in rows],
                       settings.model_copy(update={"seed": config.seed + 1}))
    del policy
    scorer = RewardScorer(inputs.reward_safety, dtype=config.dtype, batch_size=config.score_batch_size)
    contexts = [r["messages"] for r in rows]
    s_with = scorer.score(contexts, with_pre.texts).tolist()
    s_without = scorer.score(contexts, without.texts).tolist()
    for i, row in enumerate(rows):
        row.update(distilled=with_pre.texts[i], distilled_finished=with_pre.finished[i], original=without.texts[i],
                   original_finished=without.finished[i], rm_safety_distilled=round(s_with[i], 5),
                   rm_safety_original=round(s_without[i], 5))
    return {"sampling": _sampling_key(config), "policy": inputs.policy, "rows": rows}


def _sampling_key(config: ContextDistillationConfig) -> dict:
    return config.model_dump(exclude={"enabled", "targeted", "not_preferred", "compare_untargeted", "num_samples",
                                      "sft", "generation_batch_size", "score_batch_size", "dtype"})


def _usable(row: dict, which: str, require_finished: bool) -> bool:
    return bool(row[which].strip()) and (bool(row[f"{which}_finished"]) or not require_finished)


def keep(row: dict, targeted: bool, require_finished: bool = True) -> bool:
    """Whether a distilled answer is trained on: it is non-empty and (``require_finished``) ended with EOS, and
    (targeted) the safety RM scores it strictly above the original answer."""
    usable = _usable(row, "distilled", require_finished)
    return usable and (not targeted or row["rm_safety_distilled"] > row["rm_safety_original"])


def trained_on(row: dict, targeted: bool, require_finished: bool = True, not_preferred: str = "original"
               ) -> str | None:
    """Which answer a row is trained on: ``"distilled"`` when :func:`keep` says so; else, targeted with
    ``not_preferred="original"``, ``"original"`` when that answer is usable; else None (the row is dropped)."""
    if keep(row, targeted, require_finished):
        return "distilled"
    if targeted and not_preferred == "original" and _usable(row, "original", require_finished):
        return "original"
    return None


def distillation_records(rows: list[dict], targeted: bool, require_finished: bool = True,
                         not_preferred: str = "original") -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        which = trained_on(r, targeted, require_finished, not_preferred)
        if which is not None:
            out.append({"id": f"cd-{i + 1:06d}", "category": r["category"] or "safety",
                        "messages": plain_messages(r["messages"]) + [{"role": "assistant",
                                                                      "content": r[which].strip()}]})
    return out


def summarize(rows: list[dict], targeted: bool, require_finished: bool = True, not_preferred: str = "original"
              ) -> dict:
    refuses = RefusalRules(DEFAULT_REFUSAL_RULES)

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    m = {"prompts_x_samples": len(rows), "filter": "targeted" if targeted else "untargeted",
         "kept_targeted": sum(keep(r, True, require_finished) for r in rows),
         "kept_untargeted": sum(keep(r, False, require_finished) for r in rows),
         "rm_safety_original": mean([r["rm_safety_original"] for r in rows]),
         "rm_safety_distilled": mean([r["rm_safety_distilled"] for r in rows]),
         "distilled_preferred_rate": mean([float(r["rm_safety_distilled"] > r["rm_safety_original"]) for r in rows]),
         "refusal_rate_original": mean([float(refuses(r["original"])) for r in rows]),
         "refusal_rate_distilled": mean([float(refuses(r["distilled"])) for r in rows])}
    if targeted and not_preferred == "original":
        m["kept_original"] = sum(trained_on(r, True, require_finished, not_preferred) == "original" for r in rows)
    for cat in sorted({r["category"] for r in rows if r["category"]}):
        sel = [r for r in rows if r["category"] == cat]
        m[f"kept_targeted_{cat}"] = sum(keep(r, True, require_finished) for r in sel)
        m[f"refusal_rate_original_{cat}"] = mean([float(refuses(r["original"])) for r in sel])
        m[f"refusal_rate_distilled_{cat}"] = mean([float(refuses(r["distilled"])) for r in sel])
    return m


def _fine_tune(config: ContextDistillationConfig, inputs: ContextDistillationInputs, run: StageRun, rows: list[dict],
               targeted: bool, where: Path):
    records = distillation_records(rows, targeted, config.require_finished, config.not_preferred)
    if not records:
        raise InputError(f"context distillation ({'targeted' if targeted else 'untargeted'}) kept no answer: the "
                         "safety RM never preferred a distilled answer, or every one was empty or cut off")
    data = where / ("cd.jsonl" if targeted == config.targeted else "cd_untargeted.jsonl")
    if dist.is_main():
        where.mkdir(parents=True, exist_ok=True)
        write_jsonl(records, data)
    dist.barrier()
    return run_sft(config.sft, SFTInputs(base=inputs.policy, data=str(data), tokenizer=inputs.policy),
                   where / "sft", run.progress)


@stage("context-distillation")
def run_context_distillation(config: ContextDistillationConfig, inputs: ContextDistillationInputs, run: StageRun
                             ) -> StageOutput:
    """Distil the policy's answers under a safety preprompt into the policy without it (targeted by default)."""
    doc = run.samples(SAMPLES_FILE, lambda d: d.get("sampling") == _sampling_key(config)
                      and d.get("policy") == inputs.policy, lambda: generate_pairs(config, inputs))
    rows = doc["rows"]
    metrics = summarize(rows, config.targeted, config.require_finished, config.not_preferred)
    run.report(0, 1, metrics)
    sft = _fine_tune(config, inputs, run, rows, config.targeted, run.out_dir)
    metrics.update({f"sft_{k}": v for k, v in sft.metrics.items()
                    if k in ("train_loss_first", "train_loss_last", "val_loss", "train_examples")})
    if config.compare_untargeted and config.targeted:
        other = _fine_tune(config, inputs, run, rows, False, run.out_dir / UNTARGETED_DIR)
        metrics["untargeted_final"] = other.final
        metrics["untargeted_sft_train_examples"] = other.metrics.get("train_examples")
    artifacts = {}
    if dist.is_main():
        _link_tree(Path(sft.final), run.out_dir / FINAL_DIR)
        atomic_write_json(run.out_dir / "samples.json", [
            {k: r[k] for k in ("category", "preprompt", "original", "distilled", "rm_safety_original",
                               "rm_safety_distilled")} | {
                "prompt": r["messages"][-1]["content"], "kept": keep(r, config.targeted, config.require_finished),
                "trained_on": trained_on(r, config.targeted, config.require_finished, config.not_preferred)}
            for r in rows[: config.num_samples]])
        artifacts["samples"] = "samples.json"
    return StageOutput(final=run.out_dir / FINAL_DIR, metrics=metrics, steps=sft.steps, artifacts=artifacts)
