"""The export step as a Prefect task: ``llama2_align.stages.export.run_export`` plus retries, cache and artifacts."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.export import ExportConfig, ExportInputs, run_export
from llama2_align.tracking import TrackingSettings

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="export", task_run_name="export", **{**STAGE_TASK_OPTIONS, "tags": []})
def export_task(config: ExportConfig, inputs: ExportInputs, out_dir: str,
                tracking: TrackingSettings | None = None) -> dict:
    """Export ``inputs.checkpoint`` as an HF directory and/or a GGUF file into ``out_dir`` (CPU work: no gpu tag)."""
    return run_stage("export", run_export, config, inputs, out_dir, tracking)
