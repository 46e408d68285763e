"""What the TRL-trained stages (SFT, reward models) share: one config base, atomic checkpoints, metrics.

TRL's trainers are transformers ``Trainer`` subclasses: they already save optimizer, scheduler, RNG and data
position in ``checkpoint-<step>`` and skip the batches already seen on resume. Two things are added here:
checkpoints are written into a staging directory and renamed into place when complete (a kill mid-save never leaves
a half checkpoint that resume would pick), and metrics go to ``metrics.jsonl`` with a progress hook. Where to resume
from is the stage skeleton's job (``StageRun.resume``).

A checkpoint's model (its trainable tensors) and optimizer are one DCP checkpoint (``models/``, ``llama2_align.dcp``)
instead of the Trainer's ``model.safetensors`` + ``optimizer.pt`` or accelerate's FSDP files: each rank writes its
shards, loading runs no pickled code, and it loads at another world size and across ``ddp`` / ``fsdp``. With
``sharding: fsdp`` on several GPUs the Trainer shards the model with FSDP2 through accelerate's plugin
(``llama2_align.fsdp``); accelerate 1.15 turns that plugin on for GPUs only, so it is refused on the CPU, where the
Trainer would silently run DDP instead.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import dist
from ..errors import ConfigError
from ..io import append_jsonl
from ..dist import LaunchSettings
from ..lora import LoraSettings
from .common import METRICS_FILE, STAGING_DIR, StageRun, prune_checkpoints


class TrainStageConfig(BaseModel):
    """Optimisation settings shared by the supervised stages. ``batch_size`` is the effective (global) batch:
    gradient accumulation is derived from it, so halving ``micro_batch_size`` (OOM back-off) keeps it fixed."""

    model_config = ConfigDict(extra="forbid")


    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "cosine_with_min_lr"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # for cosine_with_min_lr
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_warmup_steps: int = Field(0, ge=0)
    epochs: float = Field(2.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: run all epochs)")
    batch_size: int = Field(64, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    max_length: int = Field(4096, ge=8)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(100, ge=1)
    save_steps: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    gradient_checkpointing: bool = False
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dtype: str = "auto"
    seed: int = 0
    num_processes: int = Field(1, ge=1, description="processes (GPUs) to run the stage on, via torchrun")
    launch: LaunchSettings = Field(default_factory=LaunchSettings, description="multi-node: nodes, this node's rank, "
                                   "the rendezvous (num_processes is then per node)")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with num_processes > 1: ddp keeps a whole copy of the model on each process; fsdp shards "
                           "parameters, gradients and optimizer state (FSDP2, one unit per decoder layer)")
    progress_bar: bool = True

    @model_validator(mode="after")
    def _check_batch(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        return self

    def gradient_accumulation(self, world_size: int = 1) -> int:
        per_step = self.micro_batch_size * world_size
        return max(1, self.batch_size // per_step)

    def planned_steps(self, n_examples: int, world_size: int = 1) -> int:
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.micro_batch_size * world_size * self.gradient_accumulation(world_size)
        return max(1, math.ceil(n_examples / per_step)) * math.ceil(self.epochs)

    def warmup_steps(self, total_steps: int) -> int:
        return max(self.min_warmup_steps, math.ceil(self.warmup_ratio * total_steps))

    def smaller(self) -> "TrainStageConfig | None":
        """The OOM back-off: half the micro-batch, twice the accumulation, same effective batch (None at 1)."""
        if self.micro_batch_size <= 1:
            return None
        return self.model_copy(update={"micro_batch_size": self.micro_batch_size // 2})

    def batch_summary(self) -> str:
        return (f"micro_batch_size {self.micro_batch_size}, gradient accumulation {self.gradient_accumulation()} "
                f"(effective batch {self.batch_size})")


def trainer_arguments(config: TrainStageConfig, out_dir: Path, n_train: int, has_eval: bool) -> dict:
    """Keyword arguments shared by TRL's SFTConfig and RewardConfig."""
    import torch

    from .. import fsdp
    from ..device import resolve_device, resolve_dtype

    device = resolve_device("auto")
    dtype = resolve_dtype(config.dtype, device)
    ws = dist.world_size()
    total = config.planned_steps(n_train, ws)
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.micro_batch_size * 2,
        gradient_accumulation_steps=config.gradient_accumulation(ws),
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps(total),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.keep_checkpoints,
        eval_strategy="steps" if has_eval else "no",
        eval_on_start=has_eval,  # the held-out loss before any training: the curve's first point
        eval_steps=config.eval_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=not (config.progress_bar and dist.is_main()),
        dataloader_num_workers=0,
        activation_checkpointing=config.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        max_length=config.max_length,
        save_only_model=False,
    )
    if config.lr_scheduler == "cosine_with_min_lr":
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": config.min_lr_ratio}
    if ws > 1:
        # Every parameter takes part in the loss (LoRA's frozen base has no gradients at all): skip DDP's extra
        # search for unused parameters, which transformers turns on by default without gradient checkpointing.
        kwargs["ddp_find_unused_parameters"] = False
    if fsdp.enabled(config):
        if device.type != "cuda":
            raise ConfigError("sharding: fsdp for SFT and the reward models needs GPUs: accelerate turns its FSDP "
                              "plugin on for GPU devices only, and on the CPU the Trainer would silently run DDP; use "
                              "sharding: ddp on the CPU (PPO shards on the CPU as well)")
        kwargs.update(fsdp.trainer_arguments())
    return kwargs


DCP_DIR = "models"  # a checkpoint's model (trainable tensors) and optimizer, one DCP checkpoint
SCHEDULER_FILE = "scheduler.pt"  # the Trainer's name


class AtomicCheckpoints:
    """Trainer mixin: write ``checkpoint-<step>`` into a staging directory and rename it into place whole, with the
    model and the optimizer as one DCP checkpoint (``models/``), loaded from there on resume, sharded or not."""

    def _save_checkpoint(self, model, trial):  # noqa: D401 - transformers hook
        run_dir = Path(self.args.output_dir)
        staging = run_dir / STAGING_DIR
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # other ranks write their RNG state there: not before it is cleared
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(run_dir)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = run_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            prune_checkpoints(run_dir, self.args.save_total_limit or 0)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir=None, _internal_call=False):  # noqa: D401 - transformers hook
        if _internal_call:
            return  # a checkpoint's weights go into its DCP directory, with the optimizer (below)
        return super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir):  # noqa: D401 - transformers hook
        import torch

        from .. import dcp

        dcp.save(Path(output_dir) / DCP_DIR, {"model": (self.model, self.optimizer)})
        if self.args.should_save:  # the LR schedule's counters: plain numbers (loaded with weights_only=True)
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # noqa: D401 - transformers hook
        if not (Path(resume_from_checkpoint) / DCP_DIR).is_dir():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # a DCP checkpoint's weights are loaded with its optimizer, once that exists (below)

    def _load_optimizer_and_scheduler(self, checkpoint):  # noqa: D401 - transformers hook
        if checkpoint is None or not (Path(checkpoint) / DCP_DIR).is_dir():
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch

        from .. import dcp

        dcp.load(Path(checkpoint) / DCP_DIR, {"model": (self.model, self.optimizer)})
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_FILE, weights_only=True))


class MetricsLog:
    """TrainerCallback mixin (made a ``TrainerCallback`` in :func:`make_trainer`, where transformers is loaded):
    append every log line to metrics.jsonl (rank 0) and report it as progress."""

    def __init__(self, run: StageRun):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
        append_jsonl(self.run.out_dir / METRICS_FILE, record)
        self.run.report(state.global_step, state.max_steps, record)


def trainer_class(base):
    """``base`` (a TRL trainer class) with atomic checkpoints."""
    return type(f"Atomic{base.__name__}", (AtomicCheckpoints, base), {})


def make_trainer(base, config: TrainStageConfig, run: StageRun, **kwargs):
    """Build a TRL trainer with atomic checkpoints that logs into the stage's metrics.jsonl. Without a progress bar
    it is quiet too: no per-log dict prints and no dataset-preparation bars (the stage's progress events and
    metrics.jsonl carry that information)."""
    if not config.progress_bar:
        import datasets

        datasets.disable_progress_bars()
    from transformers import TrainerCallback

    callback = type("MetricsCallback", (MetricsLog, TrainerCallback), {})(run)
    trainer = trainer_class(base)(callbacks=[callback], **kwargs)
    if not config.progress_bar:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


# What a Trainer checkpoint needs to resume: its state, the model and optimizer (DCP) and the LR schedule
TRAINER_CHECKPOINT_FILES = ("trainer_state.json", f"{DCP_DIR}/.metadata", SCHEDULER_FILE)


def train(trainer, run: StageRun) -> None:
    """Train to the end, resuming from the stage's newest complete checkpoint (optimizer, scheduler, RNG and data
    position come back with it)."""
    resume = run.resume(expect=TRAINER_CHECKPOINT_FILES)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
