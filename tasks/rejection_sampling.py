"""Rejection-sampling fine-tuning as a Prefect task: ``run_rejection_sampling`` plus retries, cache and artifacts
(the reward distribution of kept against all samples)."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.rejection_sampling import RejectionSamplingConfig, RSInputs, run_rejection_sampling
from llama2_align.tracking import TrackingSettings

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="rejection-sampling", task_run_name="rejection-sampling", **STAGE_TASK_OPTIONS)
def rejection_sampling_task(config: RejectionSamplingConfig, inputs: RSInputs, out_dir: str,
                            tracking: TrackingSettings | None = None) -> dict:
    """Best-of-K samples of ``inputs.policy`` by the combined reward, then SFT on them; ``final`` is the new policy."""
    return run_stage("rejection-sampling", run_rejection_sampling, config, inputs, out_dir, tracking)
