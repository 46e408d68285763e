"""The SFT stage as a Prefect task: ``llama2_align.stages.sft.run_sft`` plus retries, cache and artifacts."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft
from llama2_align.tracking import TrackingSettings

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="sft", task_run_name="sft", **STAGE_TASK_OPTIONS)
def sft_task(config: SFTConfig, inputs: SFTInputs, out_dir: str,
             tracking: TrackingSettings | None = None) -> dict:
    """Supervised fine-tuning into ``out_dir``; returns the StageResult as a dict (``final`` is the model)."""
    return run_stage("sft", run_sft, config, inputs, out_dir, tracking)
