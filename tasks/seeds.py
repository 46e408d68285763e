"""The seed sweep's summary as a Prefect task: summary.json / summary.md and the ``rlhf-seeds`` artifact."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from llama2_align.pipeline import PipelineConfig
from llama2_align.seeds import render_markdown, summarize_seeds, write_summary


@task(name="seeds-report", task_run_name="seeds-report")
def seeds_report_task(config: PipelineConfig, runs: dict[int, dict]) -> dict:
    summary = summarize_seeds(config, runs)
    paths = write_summary(config, summary)
    create_markdown_artifact(render_markdown(summary), key="rlhf-seeds",
                             description=f"{config.run_name}: the headline per demo seed, its mean and spread")
    get_run_logger().info(f"seed summary: {paths['summary_md']}")
    return {**paths, "bar_passed_all": summary["bar_passed_all"]}
