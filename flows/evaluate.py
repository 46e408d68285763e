"""Evaluate policy checkpoints alone (no training): ``flows/evaluate.py:evaluate``, deployed as ``rlhf-eval``."""

from __future__ import annotations

from prefect import flow

from llama2_align.pipeline import preset_config
from llama2_align.stages.evaluate import EvalConfig, EvalInputs
from tasks.evaluate import eval_task


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoints: dict[str, str], baseline: str, prompts: str, reward_helpfulness: str, reward_safety: str,
             out_dir: str, config: EvalConfig = preset_config("demo-tiny").eval) -> dict:
    """Compare the policy ``checkpoints`` (name -> checkpoint directory) against ``baseline`` (one of the names) on
    the evaluation prompts in ``prompts``, scored by both reward models; results go to ``out_dir``."""
    return eval_task(config, EvalInputs(checkpoints=checkpoints, baseline=baseline, prompts=prompts,
                                        reward_helpfulness=reward_helpfulness, reward_safety=reward_safety), out_dir)
