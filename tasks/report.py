"""The run report as a Prefect task: report.json / report.md in the run directory and the report artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llama2_align.report import build_report, headline_rows, render_markdown, write_report


@task(name="report", task_run_name="report")
def report_task(run_dir: str, preset: str, stages: dict[str, dict], eval_result: dict | None,
                final_name: str, adherence: dict | None = None) -> dict:
    """Write the report and publish it: ``rlhf-report`` (markdown with the PPO curves inlined) and
    ``rlhf-headline`` (baseline vs final on every evaluation metric). ``adherence``: the multi-turn evaluation's
    result when it ran; stages added after RLHF are compared with the policy they started from."""
    added = None
    if eval_result:
        from llama2_align.compare import compare_eval_dir

        ec = eval_result.get("config") or {}
        added = compare_eval_dir(eval_result["out_dir"], ec.get("bootstrap_resamples", 2000), ec.get("seed", 1234))
    report = build_report(run_dir, preset, stages, eval_result, final_name, added, adherence)
    side_by_side = None
    if eval_result:
        sbs = Path(eval_result["out_dir"]) / "side_by_side.json"
        side_by_side = json.loads(sbs.read_text()) if sbs.exists() else None
    curves = None
    if "ppo" in stages and stages["ppo"].get("out_dir"):
        curves = Path(stages["ppo"]["out_dir"]) / "curves.png"
    js, md = write_report(run_dir, report, side_by_side, curves)
    create_markdown_artifact(render_markdown(report, side_by_side, curves, embed_images=True), key="rlhf-report",
                             description=f"RLHF report for {run_dir}")
    rows = headline_rows(report)
    if rows:
        create_table_artifact(rows, key="rlhf-headline", description="baseline vs final on every eval metric")
    get_run_logger().info(f"report: {md}")
    return {"report_json": str(js), "report_md": str(md), "demo_bar": report.get("demo_bar")}
