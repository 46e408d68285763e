"""The evaluation stage as a Prefect task: ``llama2_align.stages.evaluate.run_eval`` plus retries, cache and
artifacts (the per-checkpoint metrics table and side-by-side answers)."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.evaluate import EvalConfig, EvalInputs, run_eval
from llama2_align.tracking import TrackingSettings

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="eval", task_run_name="eval", **STAGE_TASK_OPTIONS)
def eval_task(config: EvalConfig, inputs: EvalInputs, out_dir: str,
              tracking: TrackingSettings | None = None) -> dict:
    """Evaluate every checkpoint in ``inputs.checkpoints`` against ``inputs.baseline`` into ``out_dir``."""
    return run_stage("eval", run_eval, config, inputs, out_dir, tracking)
