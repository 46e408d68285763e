"""Train both reward models (helpfulness and safety) from the SFT checkpoint, concurrently.

They are two submitted tasks, not subflows: Prefect 3 runs subflows one after another (ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.futures import wait
from prefect.task_runners import ProcessPoolTaskRunner

from llama2_align.pipeline import preset_config
from llama2_align.stages.reward import RewardConfig, RewardInputs
from tasks.reward import reward_task


@flow(name="reward", log_prints=True, task_runner=ProcessPoolTaskRunner(max_workers=2))
def reward(sft_model: str, data: str, run_dir: str = "runs/demo",
           helpfulness: RewardConfig = preset_config("demo-tiny").reward_helpfulness,
           safety: RewardConfig = preset_config("demo-tiny").reward_safety) -> dict[str, dict]:
    """Train ``<run_dir>/reward-helpfulness`` and ``<run_dir>/reward-safety`` from ``sft_model`` (an SFT ``final``
    directory) on the preference pairs in ``data`` (both categories). Returns ``{"helpfulness": result,
    "safety": result}``."""
    helpfulness = helpfulness.model_copy(update={"kind": "helpfulness"})
    safety = safety.model_copy(update={"kind": "safety"})
    inputs = RewardInputs(sft_model=sft_model, data=data)
    futures = {cfg.kind: reward_task.submit(cfg, inputs, str(Path(run_dir) / f"reward-{cfg.kind}"))
               for cfg in (helpfulness, safety)}
    wait(list(futures.values()))  # both finish (or fail) before either failure is raised
    return {kind: fut.result() for kind, fut in futures.items()}
