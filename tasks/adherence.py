"""The multi-turn adherence evaluation as a Prefect task: ``llama2_align.stages.adherence.run_adherence`` plus
retries, cache and artifacts (the plot of adherence against the turn, and the table by turn)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from llama2_align.stages.adherence import AdherenceConfig, AdherenceInputs, run_adherence

from .artifacts import artifact_key
from .common import STAGE_TASK_OPTIONS, run_stage


def adherence_rows(metrics: dict) -> list[dict[str, str]]:
    """One row per turn: each checkpoint's adherence and oracle helpfulness."""
    checkpoints = metrics.get("checkpoints") or {}
    turns = max((len(m["adherence_by_turn"]) for m in checkpoints.values()), default=0)

    def cell(v):
        return "n/a" if v is None else f"{v:.3f}"

    return [{"turn": str(t + 1), **{f"{name} {kind}": cell(m[f"{kind}_by_turn"][t])
                                    for name, m in checkpoints.items() for kind in ("adherence", "helpfulness")}}
            for t in range(turns)]


@task(name="adherence", task_run_name="adherence", **STAGE_TASK_OPTIONS)
def adherence_task(config: AdherenceConfig, inputs: AdherenceInputs, out_dir: str) -> dict:
    """Answer multi-turn dialogues with every checkpoint; adherence and helpfulness by turn into ``out_dir``."""
    result = run_stage("adherence", run_adherence, config, inputs, out_dir)
    create_table_artifact(adherence_rows(result["metrics"]), key=artifact_key("adherence", "by-turn"),
                          description="adherence to the system instruction and oracle helpfulness, by turn")
    return result
