"""The PPO stage as a Prefect task: ``llama2_align.stages.ppo.run_ppo`` plus retries, cache and artifacts.

The progress artifact moves every iteration, so a long run shows how far it has got in the UI."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.ppo import PPOConfig, PPOInputs, run_ppo
from llama2_align.tracking import TrackingSettings

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="ppo", task_run_name="ppo", **STAGE_TASK_OPTIONS)
def ppo_task(config: PPOConfig, inputs: PPOInputs, out_dir: str,
             tracking: TrackingSettings | None = None) -> dict:
    """PPO of the policy against both reward models into ``out_dir``; ``final`` is the aligned policy."""
    return run_stage("ppo", run_ppo, config, inputs, out_dir, tracking)
