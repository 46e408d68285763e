"""Supervised fine-tuning (Llama 2 recipe: answer-only loss, cosine lr from 2e-5, wd 0.1, batch 64, 2 epochs).

TRL's ``SFTTrainer`` trains the shared model on dialogues rendered in the Llama 2 chat format by ``chat.py``; the
dataset arrives tokenized with an ``assistant_masks`` column, so the loss is on answer tokens only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..chat import encode_dialog
from ..data import read_records
from ..generation import GenerationSettings, generate
from ..io import atomic_write_json, read_jsonl
from ..model import build_model, is_peft, is_preset, save_model, trainable_parameters
from ..tokenizer import load_tokenizer
from .common import (FINAL_DIR, METRICS_FILE, ProgressFn, StageResult, Timer, barrier, input_fingerprints,
                     is_main_process, load_result, provenance, write_result)
from .training import MetricsCallback, TrainStageConfig, make_trainer, resume_checkpoint, trainer_arguments

BASE_DIR = "base"  # where a preset-initialised base is saved when LoRA adapters need something to point to


class SFTConfig(TrainStageConfig):
    """SFT settings. Defaults are the paper's (7B/13B); :func:`sft_config_for` gives the per-size presets."""

    packing: bool = False
    val_fraction: float = Field(0.05, ge=0, lt=1)
    max_val_examples: int = Field(512, ge=0)
    num_samples: int = Field(8, ge=0, description="sample generations on held-out prompts written at the end")
    sample_max_new_tokens: int = Field(64, ge=1)


class SFTInputs(BaseModel):
    base: str  # a preset (random init, demo) or a local HF/Meta checkpoint directory
    data: str  # SFT dialogues (spec: data_specs/README.md, kind "sft")
    tokenizer: str | None = None  # defaults to the base checkpoint's own tokenizer
    data_format: Literal["auto", "native"] = "auto"


def sft_config_for(size: str) -> SFTConfig:
    """Defaults per model size: the paper's for real models, a CPU-sized recipe for the demo presets."""
    if size in ("micro", "tiny", "small"):
        # 8 epochs: at 3 the tiny model answered ~10% of held-out helpful prompts at temperature 1, too weak a base
        # for the demo's "PPO keeps helpfulness" check to mean anything (measured: 0.37 at 8 epochs).
        return SFTConfig(learning_rate=3e-3, weight_decay=0.01, epochs=8, batch_size=32, micro_batch_size=32,
                         max_length=128, warmup_ratio=0.05, logging_steps=10, eval_steps=50, save_steps=100,
                         val_fraction=0.05, num_samples=8, sample_max_new_tokens=24)
    if size == "llama2-70b":
        return SFTConfig(micro_batch_size=1, gradient_checkpointing=True, lora={"enabled": True, "r": 16, "alpha": 32})
    return SFTConfig(micro_batch_size=4, gradient_checkpointing=True)


def _split(records: list, val_fraction: float, max_val: int, seed: int):
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_val = min(max_val, int(round(len(records) * val_fraction)))
    if val_fraction > 0 and len(records) > 1:
        n_val = max(1, n_val)
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [records[i] for i in train], [records[i] for i in val]


def tokenize_dialogues(tokenizer, records) -> list[dict]:
    rows = []
    for rec in records:
        enc = encode_dialog(tokenizer, [m.model_dump() for m in rec.messages])
        rows.append({"input_ids": enc.input_ids, "assistant_masks": enc.answer_mask})
    return rows


def run_sft(config: SFTConfig, inputs: SFTInputs, out_dir: str | Path, progress: ProgressFn | None = None
            ) -> StageResult:
    """Train, checkpoint, resume. Returns the finished stage's result (at once when result.json exists)."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    out_dir = Path(out_dir)
    done = load_result(out_dir)
    if done is not None:
        return done
    timer = Timer()

    # Validate everything before anything is written.
    records = read_records(inputs.data, "sft", format=inputs.data_format)
    tok_source = inputs.tokenizer or inputs.base
    if is_preset(tok_source):
        raise ValueError(f"SFT from the preset {inputs.base!r} needs a tokenizer: set inputs.tokenizer")
    tokenizer = load_tokenizer(tok_source)
    train_recs, val_recs = _split(records, config.val_fraction, config.max_val_examples, config.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = inputs.base
    if config.lora.enabled and is_preset(inputs.base):
        # LoRA adapters need a base on disk to point to: write the preset's initial weights once, before any adapter
        # is attached (saving a wrapped model would write LoRA-renamed weights).
        base_path = str(out_dir / BASE_DIR)
        if is_main_process() and not Path(base_path).exists():
            save_model(build_model(inputs.base, "policy", dtype=config.dtype, vocab_size=len(tokenizer),
                                   seed=config.seed, device="cpu"), base_path, tokenizer, role="policy")
        barrier()
    # An adapter checkpoint as the base (rejection sampling after a LoRA SFT) is merged first.
    model = build_model(base_path, "policy", lora=config.lora, dtype=config.dtype, vocab_size=len(tokenizer),
                        seed=config.seed, gradient_checkpointing=config.gradient_checkpointing,
                        continue_adapter=False)

    train_ds = Dataset.from_list(tokenize_dialogues(tokenizer, train_recs))
    val_ds = Dataset.from_list(tokenize_dialogues(tokenizer, val_recs)) if val_recs else None
    args = TRLSFTConfig(
        **trainer_arguments(config, out_dir, len(train_ds), val_ds is not None),
        packing=config.packing,
        dataset_kwargs={},
    )
    trainer = make_trainer(SFTTrainer, config, model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                      processing_class=tokenizer, callbacks=[MetricsCallback(out_dir, "sft", progress)])
    resume = resume_checkpoint(out_dir)
    trainer.train(resume_from_checkpoint=resume)

    final_metrics: dict = {"train_loss_last": None}
    logs = read_jsonl(out_dir / METRICS_FILE) if is_main_process() else []
    losses = [r["loss"] for r in logs if "loss" in r]
    if losses:
        final_metrics["train_loss_first"] = losses[0]
        final_metrics["train_loss_last"] = losses[-1]
    if val_ds is not None:
        vals = [(r["step"], r["eval_loss"]) for r in logs if "eval_loss" in r]
        # Decide from the trainer's own log history (the same on every rank, unlike metrics.jsonl which only rank 0
        # reads): under torchrun evaluate() is a collective, so all ranks must call it or none.
        evals = [(r["step"], r["eval_loss"]) for r in trainer.state.log_history if "eval_loss" in r]
        if evals and evals[-1][0] == trainer.state.global_step:
            final_metrics["val_loss"] = float(evals[-1][1])  # already evaluated at the last step
        else:
            final_metrics["val_loss"] = float(trainer.evaluate()["eval_loss"])
        if vals:
            final_metrics["val_loss_first"] = vals[0][1]
    trained, total = trainable_parameters(model)
    final_metrics.update(trainable_params=trained, total_params=total, train_examples=len(train_ds),
                         val_examples=len(val_ds) if val_ds is not None else 0)

    artifacts: dict[str, str] = {}
    if is_main_process():
        save_model(trainer.model, out_dir / FINAL_DIR, tokenizer, role="policy",
                   base=base_path if is_peft(trainer.model) else None)
        if config.num_samples and val_recs:
            samples = sample_generations(trainer.model, tokenizer, val_recs[: config.num_samples],
                                         config.sample_max_new_tokens, config.seed)
            atomic_write_json(out_dir / "samples.json", samples)
            artifacts["samples"] = "samples.json"
        from ..plots import plot_curves

        if plot_curves(logs, ["loss", "eval_loss"], out_dir / "curves.png", title="SFT loss"):
            artifacts["curves"] = "curves.png"
    result = StageResult(
        stage="sft",
        out_dir=str(out_dir),
        final=str(out_dir / FINAL_DIR),
        metrics=final_metrics,
        steps=int(trainer.state.global_step),
        duration_s=round(timer.elapsed, 2),
        artifacts=artifacts,
        config=config.model_dump(),
        inputs=input_fingerprints(inputs.model_dump()),
        provenance={**provenance(), "resumed_from": resume},
    )
    return write_result(result)


def sample_generations(model, tokenizer, records, max_new_tokens: int, seed: int) -> list[dict]:
    """Greedy answers to the first user turn of held-out dialogues, beside the reference answer."""
    prompts, refs = [], []
    for rec in records:
        msgs = [m.model_dump() for m in rec.messages]
        cut = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:cut])
        refs.append(msgs[cut]["content"])
    gens = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0,
                                                                 seed=seed))
    return [{"prompt": p[-1]["content"], "reference": r, "response": t}
            for p, r, t in zip(prompts, refs, gens.texts)]
