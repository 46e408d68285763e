"""The full Llama 2 alignment recipe as one flow: the DAG reads top to bottom.

    data (demo world or files) -> tokenizer -> SFT -> {helpfulness RM, safety RM} -> [rejection sampling] -> PPO
    -> evaluation (SFT vs final policy) -> report

Every stage is a retryable, cached task; the two reward models are submitted together (Prefect subflows would run
one after another) and run in their own processes. A failed stage stops its dependents, is named in the error and
in report.json; a re-run with the same parameters is served from the cache for every finished stage.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ProcessPoolTaskRunner

from llama2_align.pipeline import PipelineConfig, ResolvedPipeline, model_size, resolve
from llama2_align.report import bar_line, headline_rows
from llama2_align.stages.evaluate import EvalInputs
from llama2_align.stages.ppo import PPOInputs
from llama2_align.stages.reward import RewardInputs
from llama2_align.stages.sft import SFTInputs
from tasks.demo import demo_data_task
from tasks.evaluate import eval_task
from tasks.ppo import ppo_task
from tasks.report import report_task
from tasks.reward import reward_task
from tasks.sft import sft_task


class StageFailed(RuntimeError):
    pass


def _say(msg: str) -> None:
    """A progress line: on stdout for the shell, in the run's log for the UI."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    try:
        get_run_logger().info(msg)
    except Exception:
        pass


def _reward_models_concurrently(config: PipelineConfig) -> bool:
    """Both reward models at once (two worker processes) on a GPU machine or a CPU with cores to spare; one after
    the other in this process on a small CPU, where two trainers only fight over the cores (and each worker process
    pays its own start-up)."""
    if config.concurrent_reward_models is not None:
        return config.concurrent_reward_models
    import torch

    return torch.cuda.is_available() or (os.cpu_count() or 1) >= 8


def _data_paths(cfg: ResolvedPipeline) -> dict[str, str]:
    if cfg.data.source == "demo":
        return demo_data_task(cfg.run_dir, seed=cfg.data.demo_seed, sizes=cfg.data.demo_sizes,
                              vocab_size=cfg.data.vocab_size)
    d = cfg.data
    tokenizer = d.tokenizer or cfg.base_model
    return {"sft": d.sft, "preference": d.preferences, "prompts": d.prompts, "eval": d.eval, "tokenizer": tokenizer}


@flow(name="rlhf-pipeline", task_runner=ProcessPoolTaskRunner(max_workers=2))
def rlhf_pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """SFT -> helpfulness & safety reward models -> (rejection sampling) -> PPO -> evaluation -> report.

    Choose a preset (``demo-tiny`` runs on a laptop CPU; ``llama2-7b-lora`` and friends expect GPUs and a local
    checkpoint in ``base_model``) and override any field, e.g. ``{"ppo.iterations": 50}``. Returns the paths of
    report.json / report.md and the demo bar when the oracle judged.
    """
    cfg = resolve(config)
    run = Path(cfg.run_dir)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()

    def finish(name: str, get) -> dict:
        """Record a stage's result (``get()``), or record its failure and stop the pipeline."""
        try:
            res = get()
        except Exception as exc:
            results[name] = {"status": "failed", "error": str(exc)[:2000]}
            _fail(name, exc)
        results[name] = res
        _say(f"stage {name}: done in {res.get('duration_s', 0):.1f}s -> {res.get('final') or res.get('out_dir')}")
        return res

    def stage(name: str, fn, *args, **kwargs) -> dict:
        _say(f"stage {name}: started")
        return finish(name, lambda: fn(*args, **kwargs))

    def _fail(name: str, exc: BaseException):
        report_task(str(run), cfg.preset, results, None, "ppo")
        raise StageFailed(f"stage {name!r} failed; its dependents did not run: {exc}") from exc

    _say(f"run directory {run} (preset {cfg.preset})")
    data = stage("data", lambda: {"status": "completed", "out_dir": str(run / "data"), **_data_paths(cfg)})

    sft = stage("sft", sft_task, cfg.sft, SFTInputs(base=cfg.base_model, data=data["sft"],
                                                     tokenizer=data["tokenizer"]), str(run / "sft"))

    rm_inputs = RewardInputs(sft_model=sft["final"], data=data["preference"])
    rm_configs = (("helpfulness", cfg.reward_helpfulness), ("safety", cfg.reward_safety))
    if _reward_models_concurrently(config):
        _say("stage reward-helpfulness + reward-safety: started (concurrently)")
        futures = {kind: reward_task.submit(rcfg, rm_inputs, str(run / f"reward-{kind}")) for kind, rcfg in rm_configs}
        wait(list(futures.values()))
        for kind, fut in futures.items():
            finish(f"reward-{kind}", fut.result)
    else:
        for kind, rcfg in rm_configs:
            stage(f"reward-{kind}", reward_task, rcfg, rm_inputs, str(run / f"reward-{kind}"))
    rm_h, rm_s = results["reward-helpfulness"]["final"], results["reward-safety"]["final"]

    policy = sft["final"]
    if cfg.rejection_sampling.enabled:
        from llama2_align.stages.rejection_sampling import RSInputs, rs_config_for
        from tasks.rejection_sampling import rejection_sampling_task

        rs_cfg = rs_config_for(model_size(cfg.preset))
        rs_cfg = rs_cfg.model_copy(update={k: v for k, v in cfg.rejection_sampling.model_dump().items()
                                           if k != "enabled" and v is not None})
        rs = stage("rejection-sampling", rejection_sampling_task, rs_cfg,
                   RSInputs(policy=policy, reward_helpfulness=rm_h, reward_safety=rm_s, prompts=data["prompts"]),
                   str(run / "rejection-sampling"))
        policy = rs["final"]

    ppo = stage("ppo", ppo_task, cfg.ppo, PPOInputs(policy=policy, reward_helpfulness=rm_h, reward_safety=rm_s,
                                                     prompts=data["prompts"]), str(run / "ppo"))

    checkpoints = {"sft": sft["final"]}
    if "rejection-sampling" in results:
        checkpoints["rs"] = results["rejection-sampling"]["final"]
    checkpoints["ppo"] = ppo["final"]
    ev = stage("eval", eval_task, cfg.eval, EvalInputs(checkpoints=checkpoints, baseline="sft", prompts=data["eval"],
                                                        reward_helpfulness=rm_h, reward_safety=rm_s),
               str(run / "eval"))

    stages = {k: v for k, v in results.items() if k not in ("data", "eval")}
    stages["eval"] = ev
    out = report_task(str(run), cfg.preset, stages, ev, "ppo")
    rows = headline_rows(json.loads(Path(out["report_json"]).read_text()))
    if rows:
        cols = list(rows[0])
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
        print("\n" + "  ".join(c.ljust(widths[c]) for c in cols))
        for r in rows:
            print("  ".join(r[c].ljust(widths[c]) for c in cols))
    bar = out.get("demo_bar")
    if bar:
        print(f"\ndemo bar (oracle, ppo vs sft, 95% intervals): {bar_line(bar)}")
    _say(f"pipeline finished in {time.perf_counter() - t0:.0f}s; report: {out['report_md']}")
    return out
