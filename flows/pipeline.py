"""The full Llama 2 alignment recipe as one flow; it reads like the DAG:

    data (demo world or files) -> tokenizer -> SFT -> {helpfulness RM, safety RM} -> [rejection sampling] -> PPO
    -> [context distillation] -> [GAtt] -> evaluation (SFT vs every later policy) -> [multi-turn adherence]
    -> [export of the final policy: HF directory, GGUF file] -> report

Every stage is a retryable, cached task. A failed stage stops its dependents, is named in the error and in
report.json; a re-run with the same parameters is served from the cache for every finished stage.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner

from flows.common import Stages, prepare_data, reward_models_concurrently, say, train_reward_models
from flows.post_rlhf import adherence, after_rlhf, policies
from llama2_align.io import run_lock
from llama2_align.pipeline import PipelineConfig
from llama2_align.preflight import preflight
from llama2_align.stages.evaluate import EvalInputs
from llama2_align.stages.export import ExportInputs
from llama2_align.stages.ppo import PPOInputs
from llama2_align.stages.rejection_sampling import RSInputs
from llama2_align.stages.reward import RewardInputs
from llama2_align.stages.sft import SFTInputs
from tasks.evaluate import eval_task
from tasks.export import export_task
from tasks.ppo import ppo_task
from tasks.rejection_sampling import rejection_sampling_task
from tasks.report import report_task
from tasks.sft import sft_task


@flow(name="rlhf-pipeline", task_runner=ProcessPoolTaskRunner(max_workers=2))
def rlhf_pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """SFT -> helpfulness & safety reward models -> (rejection sampling) -> PPO -> (context distillation, GAtt)
    -> evaluation -> (multi-turn adherence) -> (export) -> report.

    Choose a preset (``demo-tiny`` runs on a laptop CPU; ``llama2-7b-lora`` and friends expect GPUs and a local
    checkpoint in ``base_model``) and override any field, e.g. ``{"ppo.iterations": 50}``. Returns the paths of
    report.json / report.md and the demo bar when the oracle judged.
    """
    cfg = preflight(config)  # refuses a bad run before any task runs: the message is the flow run's state message
    with run_lock(cfg.run_dir):  # one flow run at a time in a run directory
        stages = Stages(cfg)
        say(f"run directory {cfg.run_dir} (preset {cfg.preset})")
        data = stages.record("data", lambda: prepare_data(stages))
        sft = stages.run("sft", sft_task, cfg.sft, SFTInputs(base=cfg.base_model, data=data["sft"],
                                                             tokenizer=data["tokenizer"]), stages.dir("sft"))
        rm_h, rm_s = train_reward_models(stages, RewardInputs(sft_model=sft["final"], data=data["preference"]),
                                         concurrent=reward_models_concurrently(config))
        checkpoints = {"sft": sft["final"]}
        if cfg.rejection_sampling.enabled:
            rs = stages.run("rejection-sampling", rejection_sampling_task, cfg.rejection_sampling,
                            RSInputs(policy=sft["final"], reward_helpfulness=rm_h, reward_safety=rm_s,
                                     prompts=data["prompts"]), stages.dir("rejection-sampling"))
            checkpoints["rs"] = rs["final"]
        policy = list(checkpoints.values())[-1]  # the best so far: RS when it ran, else SFT
        ppo = stages.run("ppo", ppo_task, cfg.ppo, PPOInputs(policy=policy, reward_helpfulness=rm_h,
                                                             reward_safety=rm_s, prompts=data["prompts"]),
                         stages.dir("ppo"))
        checkpoints["ppo"] = ppo["final"]
        checkpoints.update(after_rlhf(stages, ppo["final"], data["prompts"], rm_s, rm_h,
                                       instruction_demos=data.get("instruction_demos")))
        ev = stages.run("eval", eval_task, cfg.eval, EvalInputs(checkpoints=checkpoints, baseline="sft",
                                                                prompts=data["eval"], reward_helpfulness=rm_h,
                                                                reward_safety=rm_s), stages.dir("eval"))
        adh = adherence(stages, checkpoints, data["eval"], rm_h)

        final = list(policies(checkpoints))[-1]
        if cfg.export.enabled:
            stages.run("export", export_task, cfg.export, ExportInputs(checkpoint=checkpoints[final]),
                       stages.dir("export"))
        out = report_task(cfg.run_dir, cfg.preset, {k: v for k, v in stages.results.items() if k != "data"}, ev,
                          final, adherence=adh)
        stages.close(out)
        say(f"pipeline finished; report: {out['report_md']}")
        return out
