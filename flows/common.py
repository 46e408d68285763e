"""What the flows share: the ledger of a pipeline run's stages, and the steps several flows take the same way.

:class:`Stages` runs each stage task, prints a line per stage (on stdout for the shell, in the run's log for the
UI), keeps every stage's result, and when a stage fails writes the partial report and stops the flow with
:class:`StageFailed`, naming the stage. No training logic here: it lives in ``llama2_align``, called by ``tasks``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger
from prefect.futures import wait

from llama2_align.pipeline import SHARED_STAGES, PipelineConfig, ResolvedPipeline
from llama2_align.stages.reward import RewardInputs
from llama2_align.tracking import child_settings, open_run, run_link
from tasks.demo import demo_data_task
from tasks.report import report_task
from tasks.reward import reward_task


class StageFailed(RuntimeError):
    """A stage of the run failed; its dependents did not run. ``stage`` names it, ``error`` is its message."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage {stage!r} failed; its dependents did not run: {error}")
        self.stage = stage
        self.error = error


def say(msg: str) -> None:
    """A progress line: on stdout for the shell, in the run's log for the UI."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    try:
        get_run_logger().info(msg)
    except Exception:
        pass


class Stages:
    """The stages of one pipeline run, in the order they ran: ``name -> StageResult dict`` (or a failure).

    With tracking on, the run is an MLflow run (params: the resolved config) and each stage task gets
    ``tracking`` settings that nest its own run under it; :meth:`close` logs the report."""

    def __init__(self, cfg: ResolvedPipeline):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.results: dict[str, dict] = {}
        self.tracker = open_run(cfg.tracking, self.run_dir.name, self.run_dir,
                                tags={"preset": cfg.preset, "run_dir": cfg.run_dir})
        self.tracker.log_params(cfg.model_dump(mode="json", exclude={"tracking"}))
        self.tracking = child_settings(cfg.tracking, self.tracker)
        if self.tracker.run_id:
            say(f"MLflow {run_link(cfg.tracking, self.tracker.run_id)}")

    def dir(self, name: str) -> str:
        """A stage's directory: in the run directory, or in the shared one for the upstream stages."""
        return str(Path(self.cfg.upstream_dir()) / name) if name in SHARED_STAGES else str(self.run_dir / name)

    def run(self, name: str, task: Callable[..., dict], *args: Any, **kwargs: Any) -> dict:
        """Run one stage task and record its result (or its failure, which stops the pipeline)."""
        say(f"stage {name}: started")
        if self.tracking is not None:
            kwargs.setdefault("tracking", self.tracking)
        return self.record(name, lambda: task(*args, **kwargs))

    def close(self, report_paths: dict) -> None:
        """End the run's tracking: the headline metrics, the stages' wall times, report.json and report.md."""
        report = json.loads(Path(report_paths["report_json"]).read_text())
        self.tracker.log_metrics({"eval": report.get("eval", {}), "demo_bar_passed": (report.get("demo_bar") or {})
                                  .get("passed"), "duration_s": {k: v.get("duration_s") for k, v in
                                                                 report.get("stages", {}).items()}}, 0)
        for key in ("report_json", "report_md"):
            self.tracker.log_artifact(report_paths[key])
        self.tracker.end("FINISHED")

    def record(self, name: str, get: Callable[[], dict]) -> dict:
        start = time.perf_counter()
        try:
            res = get()
        except Exception as exc:
            self.results[name] = {"status": "failed", "error": str(exc)[:2000]}
            report_task(str(self.run_dir), self.cfg.preset, self.results, None, "ppo")
            self.tracker.end("FAILED")
            raise StageFailed(name, exc) from exc
        self.results[name] = res
        took, ran = time.perf_counter() - start, res.get("duration_s", 0)
        how = f"done in {ran:.1f}s" if ran <= took + 1 else f"complete already (it took {ran:.1f}s when it ran)"
        say(f"stage {name}: {how} -> {res.get('final') or res.get('out_dir')}")
        return res


def prepare_data(stages: Stages) -> dict[str, str]:
    """The data sets (and the demo tokenizer): the demo world's, written into the run directory, or your files."""
    cfg = stages.cfg
    if cfg.data.source == "demo":
        paths = demo_data_task(cfg.upstream_dir(), seed=cfg.data.demo_seed, sizes=cfg.data.demo_sizes,
                               vocab_size=cfg.data.vocab_size, dialogues=bool(cfg.data.demo_dialogues),
                               preprompts=bool(cfg.data.demo_preprompts), evasive=bool(cfg.data.demo_evasive_pairs))
    else:
        d = cfg.data
        paths = {"sft": d.sft, "preference": d.preferences, "prompts": d.prompts, "eval": d.eval,
                 "tokenizer": d.tokenizer or cfg.base_model,
                 **({"instruction_demos": d.instruction_demos} if d.instruction_demos else {})}
    return {"status": "completed", "out_dir": stages.dir("data"), **paths}


def reward_models_concurrently(config: PipelineConfig) -> bool:
    """Both reward models at once (two worker processes) on a GPU machine or a CPU with cores to spare; one after
    the other in this process on a small CPU, where two trainers only fight over the cores (and each worker process
    pays its own start-up)."""
    if config.concurrent_reward_models is not None:
        return config.concurrent_reward_models
    import torch

    return torch.cuda.is_available() or (os.cpu_count() or 1) >= 8


def train_reward_models(stages: Stages, inputs: RewardInputs, concurrent: bool,
                        init: dict[str, str] | None = None) -> tuple[str, str]:
    """The helpfulness and the safety reward model; returns their ``final`` directories. Concurrently they are two
    submitted tasks (Prefect runs subflows one after another), both awaited before either failure is raised.
    ``init``: kind -> a reward model each one is warm-started from (iterative rounds)."""
    cfg = stages.cfg
    configs = {"reward-helpfulness": cfg.reward_helpfulness, "reward-safety": cfg.reward_safety}
    own = {name: inputs.model_copy(update={"init": (init or {}).get(c.kind, inputs.init)})
           for name, c in configs.items()}
    if concurrent:
        say("stage reward-helpfulness + reward-safety: started (concurrently)")
        futures = {name: reward_task.submit(c, own[name], stages.dir(name), tracking=stages.tracking)
                   for name, c in configs.items()}
        wait(list(futures.values()))
        for name, future in futures.items():
            stages.record(name, future.result)
    else:
        for name, c in configs.items():
            stages.run(name, reward_task, c, own[name], stages.dir(name))
    return stages.results["reward-helpfulness"]["final"], stages.results["reward-safety"]["final"]
