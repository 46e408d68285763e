"""The Ghost Attention stage as a Prefect task: ``llama2_align.stages.gatt.run_gatt`` plus retries, cache and
artifacts. Inputs: the latest policy and a prompts file; a round of ``rlhf-rounds`` can add it after its PPO."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.gatt import GAttConfig, GAttInputs, run_gatt

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="gatt", task_run_name="gatt", **STAGE_TASK_OPTIONS)
def gatt_task(config: GAttConfig, inputs: GAttInputs, out_dir: str) -> dict:
    """Sample GAtt dialogues from ``inputs.policy`` and fine-tune it on their last turns into ``out_dir``."""
    return run_stage("gatt", run_gatt, config, inputs, out_dir)
