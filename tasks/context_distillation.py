"""The safety context-distillation stage as a Prefect task: ``llama2_align.stages.context_distillation`` plus
retries, cache and artifacts. Inputs: the policy after RLHF, a prompts file and the safety RM; a round of
``rlhf-rounds`` can add it after its PPO."""

from __future__ import annotations

from prefect import task

from llama2_align.stages.context_distillation import (ContextDistillationConfig, ContextDistillationInputs,
                                                      run_context_distillation)

from .common import STAGE_TASK_OPTIONS, run_stage


@task(name="context-distillation", task_run_name="context-distillation", **STAGE_TASK_OPTIONS)
def context_distillation_task(config: ContextDistillationConfig, inputs: ContextDistillationInputs,
                              out_dir: str) -> dict:
    """Distil ``inputs.policy``'s answers under a safety preprompt into the policy without it, into ``out_dir``."""
    return run_stage("context-distillation", run_context_distillation, config, inputs, out_dir)
