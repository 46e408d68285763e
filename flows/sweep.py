"""A sweep as one flow: a grid or an Optuna study over PPO, rejection-sampling and eval settings. Each point is a
pipeline run (the ``rlhf-pipeline`` flow, as a subflow) in ``<sweep>/trials/<trial>`` that takes the sweep's data,
SFT and reward models (``shared_from``): the first trial computes them, the others find them complete. Then the
summary: sweep.json / sweep.md with the Pareto plots, and the ``rlhf-sweep`` artifact.

Trials run one after another; each stage task takes the ``gpu`` concurrency slot like any pipeline's (when the
deployment's ``LLAMA2_ALIGN_GPU_TAG=1`` tags them), so a sweep shares the GPUs with other runs under the same limit.
"""

from __future__ import annotations

import time

from prefect import flow

from flows.common import say
from flows.pipeline import rlhf_pipeline
from llama2_align.pipeline import PipelineConfig
from llama2_align.sweep import SweepConfig, check_sweep, run_sweep
from tasks.sweep import sweep_report_task


def run_trial(cfg: PipelineConfig) -> dict:
    """One trial: the pipeline as a subflow named after it. A failed trial is recorded, not raised."""
    state = rlhf_pipeline.with_options(flow_run_name=cfg.run_name)(config=cfg, return_state=True)
    rec = {"status": "completed" if state.is_completed() else "failed",
           "flow_run_id": str(state.state_details.flow_run_id)}
    if not state.is_completed():
        rec["error"] = str(state.message)[:2000]
    return rec


@flow(name="rlhf-sweep")
def rlhf_sweep(sweep: SweepConfig = SweepConfig(name="beta", grid={"ppo.kl_beta": [0.01, 0.02, 0.05, 0.1]})
               ) -> dict:
    """Run a grid (every combination) or an Optuna study over ``ppo.*``, ``rejection_sampling.*`` and ``eval.*``
    settings as pipeline runs that share SFT and the reward models; publish every trial's headline metrics with
    their intervals and the Pareto fronts (helpfulness vs violation rate, reward vs KL). Returns the summary's paths.
    """
    start = time.perf_counter()
    say(f"sweep {sweep.name} in {sweep.dir}: {'optuna' if sweep.optuna else 'grid'} over "
        f"{', '.join(sweep.optuna.space if sweep.optuna else sweep.grid)}")
    check_sweep(sweep)  # the first trial's pre-flight: bad data or a bad base model refused once, before any trial
    records = run_sweep(sweep, run_trial, log=say)
    out = sweep_report_task(sweep, records, time.perf_counter() - start)
    say(f"sweep finished; summary: {out['sweep_md']}")
    return out
