"""The steps of an RLHF round that are not training stages, as Prefect tasks: the round's prompts, the simulated
annotator, the pairs to label, the round's data, reward-model accuracy on the round's pairs, the gate and the
rounds report (``llama2_align.rounds``, ``llama2_align.rounds_report``). Each writes its files once, so a rerun
(a resumed or suspended flow run) costs next to nothing."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llama2_align import rounds as lib
from llama2_align.rounds_report import round_rows, staleness_rows, write_rounds_report

from .artifacts import png_data_uri
from .common import RETRIES, retry_transient


@task(name="round-prompts", task_run_name="round-{r}-prompts")
def round_prompts_task(plan: lib.ResolvedRounds, r: int) -> str:
    return str(lib.write_round_prompts(plan, r))


@task(name="simulated-annotator", task_run_name="round-{r}-simulated-annotator")
def simulated_labels_task(plan: lib.ResolvedRounds, r: int, collect_dir: str) -> str:
    """The demo world's own preference process labels the round's pairs (the only step that sees the oracle)."""
    out = lib.simulate_labels(plan, r, collect_dir)
    get_run_logger().info(f"round {r}: labels {out}")
    return str(out)


@task(name="to-label", task_run_name="round-{r}-to-label")
def to_label_task(plan: lib.ResolvedRounds, r: int, collect_dir: str, rows_shown: int = 50) -> str:
    """``rounds/<r>/to_label.jsonl`` (native preference format, ratings empty) and a table artifact of the pairs."""
    from llama2_align.data import write_jsonl

    records = lib.to_label_records(lib.read_pairs(collect_dir))
    out = write_jsonl(records, plan.round_dir(r) / "to_label.jsonl")
    create_table_artifact(
        [{"id": x["id"], "category": x["category"], "prompt": str(x.get("prompt") or x["messages"][-1]["content"]),
          "answer A (chosen)": x["chosen"], "answer B (rejected)": x["rejected"]} for x in records[:rows_shown]],
        key="rounds-to-label", description=f"round {r}: {len(records)} pairs to label in {out} (the first "
                                           f"{min(rows_shown, len(records))} shown)")
    return str(out)


@task(name="round-data", task_run_name="round-{r}-data")
def round_data_task(plan: lib.ResolvedRounds, r: int, labels: str, preferences: str) -> dict[str, str]:
    return lib.split_round_pairs(plan, r, Path(labels), preferences)


@task(name="rm-accuracy", task_run_name="rm-accuracy-{name}", retries=RETRIES, retry_condition_fn=retry_transient)
def rm_accuracy_task(reward_models: dict[str, str], pairs: str, out: str, name: str, batch_size: int = 64) -> dict:
    """Each reward model's accuracy on the round's test pairs of its own category."""
    result = lib.rm_accuracy(reward_models, pairs, Path(out), batch_size)
    get_run_logger().info(f"{name}: " + ", ".join(f"{k} {v.get('accuracy')}" for k, v in result.items()))
    return result


@task(name="gate", task_run_name="round-{r}-gate")
def gate_task(plan: lib.ResolvedRounds, r: int, start: lib.Start, candidate: str, reward_models: dict[str, str],
              preferences: str, before: dict, after: dict, eval_result: dict, collect_result: dict,
              stage_seconds: dict[str, float]) -> dict:
    """Promote the candidate or not (the configured gates), and record the round (``round.json``)."""
    record = lib.finish_round(plan, r, start, candidate, reward_models, preferences, before, after, eval_result,
                              collect_result, stage_seconds)
    rows = [{k: str(v) for k, v in c.items()} for c in record.gate["checks"]]
    if rows:
        create_table_artifact(rows, key="rounds-gate", description=f"round {r}: the gates "
                                                                   f"({'promoted' if record.promoted else 'refused'})")
    return record.model_dump(mode="json")


@task(name="rounds-report", task_run_name="rounds-report")
def rounds_report_task(plan: lib.ResolvedRounds) -> dict:
    """``rounds/report.{json,md}`` and the figure; publishes ``rlhf-rounds`` (markdown, the figure inlined) and
    ``rlhf-rounds-table``."""
    from llama2_align.rounds_report import render_markdown

    report, js, md = write_rounds_report(plan, lib.completed_rounds(plan))
    png = plan.rounds_dir / report["figure"] if report["figure"] else None
    create_markdown_artifact(render_markdown(report, png_data_uri(png) if png else None), key="rlhf-rounds",
                             description=f"RLHF rounds report for {plan.run_dir}")
    rows = round_rows(report)
    if rows:
        create_table_artifact(rows, key="rlhf-rounds-table", description="every round against the previous "
                                                                         "promoted policy and SFT")
    srows = staleness_rows(report)
    if srows:
        create_table_artifact(srows, key="rlhf-rounds-staleness", description="reward-model accuracy on each "
                                                                              "round's new pairs")
    return {"report_json": str(js), "report_md": str(md), "last_promoted": report["last_promoted"]}
