"""Supervised fine-tuning (Llama 2 recipe: answer-only loss, cosine lr from 2e-5, wd 0.1, batch 64, 2 epochs).

TRL's ``SFTTrainer`` trains the shared model on dialogues rendered in the Llama 2 chat format by ``chat.py``; the
dataset arrives tokenized with an ``assistant_masks`` column, so the loss is on answer tokens only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import dist
from ..chat import encode_dialog
from ..data import read_records
from ..device import resolve_dtype
from ..errors import ConfigError
from ..io import atomic_write_json, read_jsonl
from ..tokenizer import load_tokenizer
from .common import FINAL_DIR, METRICS_FILE, StageOutput, StageRun, logged_losses, stage
from .training import TrainStageConfig, make_trainer, train, trainer_arguments

BASE_DIR = "base"  # where a preset-initialised base is saved when LoRA adapters need something to point to


class SFTConfig(TrainStageConfig):
    """SFT settings. Defaults are the paper's (7B/13B); the pipeline presets (``presets.py``) say what differs."""

    packing: bool = False
    val_fraction: float = Field(0.05, ge=0, lt=1)
    max_val_examples: int = Field(512, ge=0)
    num_samples: int = Field(8, ge=0, description="sample generations on held-out prompts written at the end")
    sample_max_new_tokens: int = Field(64, ge=1)
    loss_on: Literal["all_answers", "last_answer"] = Field(
        "all_answers", description="last_answer: loss on each dialogue's last answer only (Ghost Attention)")
    group_by_length: bool | None = Field(
        None, description="batch dialogues of similar length together (less padding when short and long dialogues "
                          "mix); None: off, except in a pipeline whose demo SFT data holds multi-turn dialogues")


class SFTInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str  # a preset (random init, demo) or a local HF/Meta checkpoint directory
    data: str  # SFT dialogues (spec: data_specs/README.md, kind "sft")
    tokenizer: str | None = None  # defaults to the base checkpoint's own tokenizer
    data_format: Literal["auto", "native"] = "auto"


def _split(records: list, val_fraction: float, max_val: int, seed: int):
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_val = min(max_val, int(round(len(records) * val_fraction)))
    if val_fraction > 0 and len(records) > 1:
        n_val = max(1, n_val)
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [records[i] for i in train], [records[i] for i in val]


def tokenize_dialogues(tokenizer, records, last_answer_only: bool = False) -> list[dict]:
    rows = []
    for rec in records:
        enc = encode_dialog(tokenizer, [m.model_dump(exclude_none=True) for m in rec.messages],
                            last_answer_only=last_answer_only)
        rows.append({"input_ids": enc.input_ids, "assistant_masks": enc.answer_mask})
    return rows


@stage("sft")
def run_sft(config: SFTConfig, inputs: SFTInputs, run: StageRun) -> StageOutput:
    """Fine-tune ``inputs.base`` on the dialogues, with loss on answer tokens only; resumes from its checkpoints."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from .. import fsdp
    from ..model import build_model, is_peft, is_preset, trainable_parameters

    # Validate everything before anything is written.
    records = read_records(inputs.data, "sft", format=inputs.data_format)
    tok_source = inputs.tokenizer or inputs.base
    if is_preset(tok_source):
        raise ConfigError(f"SFT from the preset {inputs.base!r} needs a tokenizer: set inputs.tokenizer")
    tokenizer = load_tokenizer(tok_source)
    train_recs, val_recs = _split(records, config.val_fraction, config.max_val_examples, config.seed)

    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.provenance["sharding"] = fsdp.describe(config)
    base_path = _base_on_disk(config, inputs, tokenizer, run.out_dir)
    # An adapter checkpoint as the base (rejection sampling after a LoRA SFT) is merged first.
    model = build_model(base_path, "policy", lora=config.lora, dtype=resolve_dtype(config.dtype),
                        vocab_size=len(tokenizer), seed=config.seed, continue_adapter=False,
                        gradient_checkpointing=config.gradient_checkpointing, device=fsdp.build_device(config))
    last_only = config.loss_on == "last_answer"
    train_ds = Dataset.from_list(tokenize_dialogues(tokenizer, train_recs, last_only))
    val_ds = Dataset.from_list(tokenize_dialogues(tokenizer, val_recs, last_only)) if val_recs else None
    args = TRLSFTConfig(**trainer_arguments(config, run.out_dir, len(train_ds), val_ds is not None),
                        packing=config.packing, dataset_kwargs={},
                        train_sampling_strategy="group_by_length" if config.group_by_length else "random")
    trainer = make_trainer(SFTTrainer, config, run, model=model, args=args, train_dataset=train_ds,
                           eval_dataset=val_ds, processing_class=tokenizer)
    train(trainer, run)

    metrics = {"train_loss_last": None, **logged_losses(run.out_dir)}
    if val_ds is not None:
        metrics.update(_validation_loss(trainer, run.out_dir))
    trained, total = trainable_parameters(model)
    metrics.update(trainable_params=trained, total_params=total, train_examples=len(train_ds),
                   val_examples=len(val_ds) if val_ds is not None else 0)
    fsdp.save_final(trainer.model, run.out_dir / FINAL_DIR, tokenizer, role="policy",
                    base=base_path if is_peft(trainer.model) else None, dtype=resolve_dtype(config.dtype))
    artifacts = _write_artifacts(config, trainer.model, tokenizer, val_recs, run.out_dir)
    return StageOutput(final=run.out_dir / FINAL_DIR, metrics=metrics, steps=trainer.state.global_step,
                       planned_steps=trainer.state.max_steps, artifacts=artifacts)


def _base_on_disk(config: SFTConfig, inputs: SFTInputs, tokenizer, out_dir: Path) -> str:
    """The base to train from. LoRA adapters need a base on disk to point to: a preset's initial weights are written
    once into ``<out_dir>/base``, before any adapter is attached (saving a wrapped model would write LoRA-renamed
    weights)."""
    from ..model import build_model, is_preset, save_model

    if not (config.lora.enabled and is_preset(inputs.base)):
        return inputs.base
    base_path = out_dir / BASE_DIR
    if dist.is_main() and not base_path.exists():
        save_model(build_model(inputs.base, "policy", dtype=config.dtype, vocab_size=len(tokenizer), seed=config.seed,
                               device="cpu"), base_path, tokenizer, role="policy")
    dist.barrier()
    return str(base_path)


def _validation_loss(trainer, out_dir: Path) -> dict:
    """The held-out loss at the end (and the first one logged, before any training)."""
    out: dict = {}
    # Decide from the trainer's own log history (the same on every rank, unlike metrics.jsonl which only rank 0
    # reads): under torchrun evaluate() is a collective, so all ranks must call it or none.
    evals = [(r["step"], r["eval_loss"]) for r in trainer.state.log_history if "eval_loss" in r]
    if evals and evals[-1][0] == trainer.state.global_step:
        out["val_loss"] = float(evals[-1][1])  # already evaluated at the last step
    else:
        out["val_loss"] = float(trainer.evaluate()["eval_loss"])
    logged = [r["eval_loss"] for r in read_jsonl(out_dir / METRICS_FILE) if "eval_loss" in r]
    if logged:
        out["val_loss_first"] = logged[0]
    return out


def _write_artifacts(config: SFTConfig, model, tokenizer, val_recs, out_dir: Path) -> dict[str, str]:
    """Sample answers to held-out prompts and the loss curves (rank 0 writes; a sharded model samples on every
    rank, since each of its forwards gathers weights from all of them)."""
    from .. import fsdp
    from ..plots import plot_curves

    artifacts: dict[str, str] = {}
    if config.num_samples and val_recs and (dist.is_main() or fsdp.is_sharded(model)):
        samples = sample_generations(model, tokenizer, val_recs[: config.num_samples], config.sample_max_new_tokens,
                                     config.seed)
        if dist.is_main():
            atomic_write_json(out_dir / "samples.json", samples)
            artifacts["samples"] = "samples.json"
    if dist.is_main() and plot_curves(read_jsonl(out_dir / METRICS_FILE), ["loss", "eval_loss"], out_dir / "curves.png",
                   title="SFT loss"):
        artifacts["curves"] = "curves.png"
    return artifacts


def sample_generations(model, tokenizer, records, max_new_tokens: int, seed: int) -> list[dict]:
    """Greedy answers to the first user turn of held-out dialogues, beside the reference answer."""
    from ..generation import GenerationSettings, generate

    prompts, refs = [], []
    for rec in records:
        msgs = [m.model_dump(exclude_none=True) for m in rec.messages]
        cut = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:cut])
        refs.append(msgs[cut]["content"])
    gens = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0,
                                                                 seed=seed))
    return [{"prompt": p[-1]["content"], "reference": r, "response": t}
            for p, r, t in zip(prompts, refs, gens.texts)]
