"""The same pipeline on several demo seeds (``llama2-align run --seeds 0,1,2``): a claim about the demo holds on
several seeds, not one. Each seed is an ordinary ``rlhf-pipeline`` run (``<run_name>-s<seed>``, cached and
resumable as any), run one after another; then ``<run_name>-seeds/summary.{json,md}`` and the ``rlhf-seeds``
artifact: every headline metric per seed with its interval, the change's mean and spread, the bar per seed.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from flows.common import say
from flows.pipeline import rlhf_pipeline
from llama2_align.pipeline import PipelineConfig
from llama2_align.preflight import preflight
from llama2_align.seeds import seed_configs
from tasks.seeds import seeds_report_task


@flow(name="rlhf-seeds")
def rlhf_seeds(config: PipelineConfig = PipelineConfig(), seeds: list[int] = [0, 1, 2]) -> dict:  # noqa: B006
    """Run the pipeline ``config`` once per demo seed and summarise what holds across the seeds."""
    configs = seed_configs(config, seeds)
    for cfg in configs.values():  # every run refused before any of them starts
        preflight(cfg)
    runs: dict[int, dict] = {}
    for seed, cfg in configs.items():
        say(f"seed {seed}: run {cfg.run_name}")
        start = time.perf_counter()
        state = rlhf_pipeline.with_options(flow_run_name=cfg.run_name)(config=cfg, return_state=True)
        run = {"status": "completed" if state.is_completed() else "failed",
               "run_dir": str(Path(cfg.runs_root) / cfg.run_name), "wall_s": round(time.perf_counter() - start, 1)}
        if state.is_completed():
            run["report_json"] = state.result()["report_json"]
        else:
            run["error"] = str(state.message)[:2000]
        runs[seed] = run
    out = seeds_report_task(config, runs)
    say(f"seeds finished; summary: {out['summary_md']}")
    return out
