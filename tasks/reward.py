"""A reward model (helpfulness or safety, from ``config.kind``) as a Prefect task: ``run_reward`` plus retries,
cache and artifacts. The task run is named after the stage: ``reward-helpfulness`` / ``reward-safety``."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.reward import RewardConfig, RewardInputs, run_reward

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="reward", task_run_name="reward-{config.kind}", tags=["gpu"], **STAGE_TASK_OPTIONS)
def reward_task(config: RewardConfig, inputs: RewardInputs, out_dir: str) -> dict:
    """Train one reward model into ``out_dir``; the result's metrics hold the held-out accuracy table."""
    return run_stage(f"reward-{config.kind}", run_reward, config, inputs, out_dir)
