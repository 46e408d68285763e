"""The collect stage as a Prefect task: ``llama2_align.stages.collect.run_collect`` plus retries, cache and artifacts
(a few of the round's pairs)."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.collect import CollectConfig, CollectInputs, run_collect

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="collect", task_run_name="collect", **STAGE_TASK_OPTIONS)
def collect_task(config: CollectConfig, inputs: CollectInputs, out_dir: str) -> dict:
    """Pairs of the policy's answers to the round's prompts, for annotation, into ``out_dir/pairs.jsonl``."""
    return run_stage("collect", run_collect, config, inputs, out_dir)
