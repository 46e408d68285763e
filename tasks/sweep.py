"""The sweep's summary as a Prefect task: sweep.json / sweep.md and the Pareto plots in the sweep directory, and the
``rlhf-sweep`` artifact (the table and the plots inlined) plus ``rlhf-sweep-table``."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llama2_align.sweep import SweepConfig, render_markdown, summarize, table_rows, write_sweep

from .artifacts import png_data_uri


@task(name="sweep-report", task_run_name="sweep-report")
def sweep_report_task(sweep: SweepConfig, records: list[dict], wall_s: float) -> dict:
    summary = summarize(sweep, records, wall_s)
    paths = write_sweep(summary)
    create_markdown_artifact(render_markdown(summary, image=png_data_uri), key="rlhf-sweep",
                             description=f"sweep {sweep.name}: every trial's headline metrics and the Pareto fronts")
    create_table_artifact(table_rows(summary), key="rlhf-sweep-table",
                          description=f"sweep {sweep.name}: one row per trial")
    get_run_logger().info(f"sweep summary: {paths['sweep_md']}")
    return {**paths, "saved_fraction": summary["timing"]["saved_fraction"], "wall_s": summary["timing"]["wall_s"]}
