"""A reward model (helpfulness or safety, from ``config.kind``) as a Prefect task: ``run_reward`` plus retries,
cache and artifacts. The task run is named after the stage: ``reward-helpfulness`` / ``reward-safety``."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.reward import RewardConfig, RewardInputs, run_reward
from llama2_align.tracking import TrackingSettings

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="reward", task_run_name="reward-{config.kind}", **STAGE_TASK_OPTIONS)
def reward_task(config: RewardConfig, inputs: RewardInputs, out_dir: str,
                tracking: TrackingSettings | None = None) -> dict:
    """Train one reward model into ``out_dir``; the result's metrics hold the held-out accuracy table."""
    _share_cpu_cores()
    return run_stage(f"reward-{config.kind}", run_reward, config, inputs, out_dir, tracking)


def _share_cpu_cores() -> None:
    """The two reward models run at once in two worker processes; on a CPU each takes half the cores instead of
    both oversubscribing all of them (which made the pair ~3x slower on the 2-core demo machine)."""
    import multiprocessing
    import os

    import torch

    if multiprocessing.parent_process() is not None and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
