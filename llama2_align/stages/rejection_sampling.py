"""Rejection-sampling fine-tuning, Llama 2's step before PPO (§3.2.3).

1. sample   K responses per prompt from the current policy (seeded; temperature ~1.2–1.3 in the paper when K is
            large, 1.0 for the demo);
2. score    each with both reward models and the SAME combined reward as PPO: ``Rc = Rs if is_safety(prompt) or
            Rs < 0.15 else Rh`` (:func:`ppo_core.combine_rewards` on the raw scores);
3. keep     the best response per prompt;
4. finetune the policy on the kept dialogues by reusing the SFT stage (``<out_dir>/sft``, which resumes by itself).

Stage directory: ``rs_samples.json`` (every prompt's K samples with scores; written atomically and reused on a
re-run, so a crash during fine-tuning never re-samples), ``kept.jsonl`` (the SFT data), ``sft/`` (the inner SFT
stage), ``final/`` (the fine-tuned model, hard-linked from ``sft/final``), ``samples.json`` (a few prompts with their
samples), ``reward_distribution.png``, ``result.json`` (last).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .. import dist
from ..data import plain_messages, read_records, write_jsonl
from ..errors import InputError
from ..io import atomic_dir, atomic_write_json
from ..tokenizer import load_tokenizer
from .common import FINAL_DIR, StageOutput, StageRun, stage
from .reward import RewardScorer
from .sft import SFTConfig, SFTInputs, run_sft

SAMPLES_FILE = "rs_samples.json"  # everything sampled and scored (the resume point)
KEPT_FILE = "kept.jsonl"  # the best response per prompt, as SFT dialogues
SFT_DIR = "sft"


class RejectionSamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="run this stage in the pipeline (SFT -> RS -> PPO)")
    k: int = Field(4, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0, description="paper: 1.2-1.3 when K is large; 1.0 for the demo")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    max_prompts: int | None = Field(None, ge=1, description="a seeded subset of the prompts (None: all)")
    generation_batch_size: int = Field(64, ge=1)
    score_batch_size: int = Field(64, ge=1)
    # the PPO reward, so both steps optimise the same thing
    piecewise_reward: bool = True
    safety_threshold: float = 0.15
    require_eos: bool = Field(True, description="only responses that ended with EOS can be kept (when any did)")
    num_samples: int = Field(6, ge=0, description="prompts (with all K samples) written to samples.json")
    dtype: str = "auto"
    seed: int = 0
    sft: SFTConfig = Field(default_factory=SFTConfig, description="the fine-tune on the kept samples")


class RSInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str  # the checkpoint to sample from and fine-tune (SFT, or the previous RS round)
    reward_helpfulness: str
    reward_safety: str
    prompts: str  # kind "prompts", with is_safety


def _sampling_key(config: RejectionSamplingConfig) -> dict:
    """What the samples depend on: a saved samples file is reused only when these match."""
    return config.model_dump(include={"k", "temperature", "top_p", "max_new_tokens", "max_prompts", "seed",
                                      "piecewise_reward", "safety_threshold", "require_eos"})


def _pick_prompts(n: int, max_prompts: int | None, seed: int) -> list[int]:
    idx = list(range(n))
    if max_prompts is not None and max_prompts < n:
        idx = sorted(random.Random(seed).sample(idx, max_prompts))
    return idx


def sample_and_score(config: RejectionSamplingConfig, inputs: RSInputs) -> dict:
    """Sample K responses per prompt, score them with both RMs, mark the best per prompt. Returns the samples
    document (plain JSON) that :data:`SAMPLES_FILE` holds."""
    import torch

    from .. import ppo_core as core
    from ..generation import GenerationSettings, generate
    from ..model import build_model, freeze

    records = read_records(inputs.prompts, "prompts")
    chosen = _pick_prompts(len(records), config.max_prompts, config.seed)
    tokenizer = load_tokenizer(inputs.policy)
    policy = freeze(build_model(inputs.policy, "policy", dtype=config.dtype, seed=config.seed))
    contexts = [records[i].context_messages() for i in chosen]
    repeated = [c for c in contexts for _ in range(config.k)]  # prompt-major: rows p*K .. p*K+K-1
    gens = generate(policy, tokenizer, repeated,
                    GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p, batch_size=config.generation_batch_size, seed=config.seed))
    del policy
    # Score exactly what PPO scores: prompt ids + response ids (EOS included when the model stopped).
    seqs = [p + r for p, r in zip(gens.prompt_ids, gens.response_ids)]
    scores = {}
    for name, path in (("rm_helpfulness", inputs.reward_helpfulness), ("rm_safety", inputs.reward_safety)):
        scorer = RewardScorer(path, dtype=config.dtype, batch_size=config.score_batch_size)
        scores[name] = scorer.score_ids(seqs)
        del scorer
    is_safety = torch.tensor([bool(records[i].is_safety) for i in chosen for _ in range(config.k)])
    rc = core.combine_rewards(scores["rm_helpfulness"], scores["rm_safety"], is_safety, config.safety_threshold,
                              config.piecewise_reward)
    if not torch.isfinite(rc).all():
        raise RuntimeError("rejection sampling: a reward model returned NaN or inf scores")

    prompts_out = []
    for p, i in enumerate(chosen):
        rows = range(p * config.k, (p + 1) * config.k)
        samples = [{"response": gens.texts[j], "finished": gens.finished[j], "length": len(gens.response_ids[j]),
                    "rm_helpfulness": float(scores["rm_helpfulness"][j]), "rm_safety": float(scores["rm_safety"][j]),
                    "reward_combined": float(rc[j])} for j in rows]
        # Candidates: non-empty text (an SFT answer cannot be empty) and, when asked and possible, ended with EOS.
        cands = [s for s in range(config.k) if samples[s]["response"].strip()]
        if config.require_eos and any(samples[s]["finished"] for s in cands):
            cands = [s for s in cands if samples[s]["finished"]]
        kept = max(cands, key=lambda s: samples[s]["reward_combined"]) if cands else None
        prompts_out.append({"index": i, "id": records[i].id, "messages": contexts[p],
                            "is_safety": bool(records[i].is_safety), "samples": samples, "kept": kept})
    return {"sampling": _sampling_key(config), "policy": inputs.policy, "prompts": prompts_out}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def summarize_samples(doc: dict) -> dict:
    """Mean combined reward of all samples vs the kept ones, overall and per is_safety split; counts."""
    metrics: dict = {}
    for split, pred in (("", lambda p: True), ("_safety", lambda p: p["is_safety"]),
                        ("_helpful", lambda p: not p["is_safety"])):
        sel = [p for p in doc["prompts"] if pred(p)]
        all_r = [s["reward_combined"] for p in sel for s in p["samples"]]
        kept_r = [p["samples"][p["kept"]]["reward_combined"] for p in sel if p["kept"] is not None]
        metrics[f"reward_all_mean{split}"] = _mean(all_r)
        metrics[f"reward_kept_mean{split}"] = _mean(kept_r)
    everything = [s for p in doc["prompts"] for s in p["samples"]]
    kept = [p["samples"][p["kept"]] for p in doc["prompts"] if p["kept"] is not None]
    metrics.update(
        prompts=len(doc["prompts"]),
        prompts_safety=sum(p["is_safety"] for p in doc["prompts"]),
        samples=len(everything),
        kept=len(kept),
        rm_helpfulness_all_mean=_mean([s["rm_helpfulness"] for s in everything]),
        rm_safety_all_mean=_mean([s["rm_safety"] for s in everything]),
        eos_frac_all=_mean([float(s["finished"]) for s in everything]),
        eos_frac_kept=_mean([float(s["finished"]) for s in kept]),
    )
    return metrics


def _link_tree(src: Path, dst: Path) -> None:
    """``final/`` as hard links to the inner SFT's output (no second copy of the weights); copies across devices."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=link)


@stage("rejection-sampling")
def run_rejection_sampling(config: RejectionSamplingConfig, inputs: RSInputs, run: StageRun) -> StageOutput:
    """Sample K responses per prompt, keep the best by the combined reward, fine-tune the policy on the kept ones."""
    doc = run.samples(SAMPLES_FILE, lambda d: d.get("sampling") == _sampling_key(config),
                      lambda: sample_and_score(config, inputs))
    metrics = summarize_samples(doc)
    run.report(0, 1, metrics)

    kept = [p for p in doc["prompts"] if p["kept"] is not None]
    if not kept:
        raise InputError("rejection sampling kept nothing: every sampled response was empty")
    kept_path = run.out_dir / KEPT_FILE
    if dist.is_main():
        write_jsonl([{"id": f"rs-{p['id'] or p['index']}", "category": "safety" if p["is_safety"] else "helpful",
                      "messages": plain_messages(p["messages"]) + [{"role": "assistant",
                                                    "content": p["samples"][p["kept"]]["response"].strip()}]}
                     for p in kept], kept_path)
    dist.barrier()

    # Fine-tune on the kept samples: the SFT stage itself, in its own resumable directory.
    sft_result = run_sft(config.sft, SFTInputs(base=inputs.policy, data=str(kept_path), tokenizer=inputs.policy),
                         run.out_dir / SFT_DIR, run.progress)
    run.provenance["sft_resumed_from"] = sft_result.provenance.get("resumed_from")
    metrics.update({f"sft_{k}": v for k, v in sft_result.metrics.items()
                    if k in ("train_loss_first", "train_loss_last", "val_loss", "train_examples")})
    artifacts: dict[str, str] = {}
    if dist.is_main():
        _link_tree(Path(sft_result.final), run.out_dir / FINAL_DIR)
        artifacts = _write_artifacts(config, doc, kept, sft_result, run.out_dir)
    return StageOutput(final=run.out_dir / FINAL_DIR, metrics=metrics, steps=sft_result.steps,
                       planned_steps=sft_result.planned_steps, artifacts=artifacts)


def _write_artifacts(config: RejectionSamplingConfig, doc: dict, kept: list[dict], sft_result, out_dir: Path
                     ) -> dict[str, str]:
    """A few prompts with all their samples, the reward distribution of all against kept samples (rank 0)."""
    from ..plots import plot_histograms

    show = [{"prompt": p["messages"][-1]["content"], "is_safety": p["is_safety"], "kept": p["kept"],
             "samples": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
                         for s in p["samples"]]}
            for p in doc["prompts"][: config.num_samples]]
    atomic_write_json(out_dir / "samples.json", show)
    artifacts = {"samples": "samples.json"}
    all_r = [s["reward_combined"] for p in doc["prompts"] for s in p["samples"]]
    kept_r = [p["samples"][p["kept"]]["reward_combined"] for p in kept]
    if plot_histograms({f"all samples (K={config.k})": all_r, "kept (best of K)": kept_r},
                       out_dir / "reward_distribution.png", title="Rejection sampling: combined reward"):
        artifacts["reward_distribution"] = "reward_distribution.png"
    if "curves" in sft_result.artifacts:
        artifacts["sft_curves"] = f"{SFT_DIR}/{sft_result.artifacts['curves']}"
    return artifacts
