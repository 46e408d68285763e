"""Iterative RLHF rounds (Llama 2-Chat's RLHF-V1 ... Vn) as one flow; it reads like the recipe:

    round 0: data -> tokenizer -> SFT -> {helpfulness RM, safety RM}          (the pipeline's own stages and cache)
    round r: prompts -> collect pairs from the last promoted policy -> annotate (simulated, or people: the run waits)
             -> RM accuracy on the round's test pairs (before) -> retrain both RMs on all pairs so far, warm-started
             -> RM accuracy (after) -> rs | ppo | rs+ppo -> [context distillation] -> [GAtt]
             -> eval (vs the last promoted policy and SFT) -> gate
             -> rounds report

Rounds are not subflows: one flow run, so a deployment's run can suspend while people label (a subflow cannot) and
no round pays a flow run's overhead. The logic lives in ``llama2_align.rounds``; the tasks in ``tasks/``.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner

from flows.annotation import human_labels
from flows.post_rlhf import after_rlhf, policies
from flows.common import Stages, prepare_data, reward_models_concurrently, say, train_reward_models
from llama2_align import rounds as lib
from llama2_align.preflight import preflight_rounds
from llama2_align.stages.collect import CollectInputs
from llama2_align.stages.evaluate import EvalInputs
from llama2_align.stages.ppo import PPOInputs
from llama2_align.stages.rejection_sampling import RSInputs
from llama2_align.stages.reward import RewardInputs
from llama2_align.stages.sft import SFTInputs
from tasks.collect import collect_task
from tasks.evaluate import eval_task
from tasks.ppo import ppo_task
from tasks.rejection_sampling import rejection_sampling_task
from tasks.rounds import (gate_task, rm_accuracy_task, round_data_task, round_prompts_task, rounds_report_task,
                          simulated_labels_task)
from tasks.sft import sft_task


@flow(name="rlhf-rounds", task_runner=ProcessPoolTaskRunner(max_workers=2))
def rlhf_rounds(config: lib.RoundsConfig = lib.RoundsConfig()) -> dict:
    """Round 0 (SFT and both reward models), then ``rounds`` rounds of collect -> annotate -> retrain the reward
    models -> improve the policy (``methods``: rs, ppo or rs+ppo) -> evaluate -> gate. ``annotator: human`` writes
    each round's pairs to label and waits (resume from the UI with the labelled file's path, or
    ``llama2-align rounds resume RUN --labels FILE``). Returns the rounds report's paths."""
    plan = preflight_rounds(config)  # refuses a bad run before round 0: the message is the flow run's state message
    lib.open_state(plan)
    stages = Stages(plan.round0)
    say(f"rounds run {plan.run_dir}: {plan.config.rounds} round(s) {plan.methods} after round 0 "
        f"(preset {plan.config.preset}, annotator {plan.config.annotator})")
    try:
        data = stages.record("data", lambda: prepare_data(stages))
        sft = stages.run("sft", sft_task, plan.round0.sft, SFTInputs(base=plan.round0.base_model, data=data["sft"],
                                                                     tokenizer=data["tokenizer"]), stages.dir("sft"))
        concurrent = reward_models_concurrently(config.pipeline_config())
        rm_h, rm_s = train_reward_models(stages, RewardInputs(sft_model=sft["final"], data=data["preference"]),
                                         concurrent)
        records: list[lib.RoundRecord] = []
        for r in range(1, plan.config.rounds + 1):
            start = lib.starting_point(records, sft["final"], {"helpfulness": rm_h, "safety": rm_s},
                                       data["preference"])
            records.append(run_round(plan, r, start, sft["final"], data, concurrent))
    except Exception as exc:  # a pause or a suspension is not an Exception: the run waits, it has not failed
        lib.update_state(plan, status="failed", error=str(exc)[:2000])
        raise
    out = rounds_report_task(plan)
    lib.update_state(plan, status="finished")
    say(f"rounds finished; last promoted: round {out['last_promoted']}; report: {out['report_md']}")
    return out


def run_round(plan: lib.ResolvedRounds, r: int, start: lib.Start, sft: str, data: dict, concurrent: bool
              ) -> lib.RoundRecord:
    done = lib.load_round(plan, r)
    if done is not None:
        say(f"round {r}: done before ({'promoted' if done.promoted else 'not promoted'})")
        return done
    method, cfg = plan.methods[r - 1], plan.round_pipeline(r)
    stages = Stages(cfg)  # this round's ledger; its stage directories are under rounds/<r>/
    say(f"round {r} ({method}) starts from round {start.round}'s policy {start.policy}")

    prompts = round_prompts_task(plan, r)
    variant_b = start.before if plan.config.second_variant == "previous" else None
    pairs = stages.run("collect", collect_task, plan.round_collect(r),
                       CollectInputs(policy=start.policy, policy_b=variant_b, prompts=prompts), stages.dir("collect"))
    labels = simulated_labels_task(plan, r, pairs["out_dir"]) if plan.config.annotator == "simulated" else \
        human_labels(plan, r, pairs["out_dir"])
    split = round_data_task(plan, r, labels, start.preferences)
    before = rm_accuracy_task(start.reward_models, split["test"], stages.dir(lib.STALENESS_BEFORE),
                              f"round-{r}-before")
    rm_h, rm_s = train_reward_models(stages, RewardInputs(sft_model=sft, data=split["preferences"]), concurrent,
                                     init=start.reward_models)
    rms = {"helpfulness": rm_h, "safety": rm_s}
    after = rm_accuracy_task(rms, split["test"], stages.dir(lib.STALENESS_AFTER), f"round-{r}-after")

    policy = start.policy
    if method in ("rs", "rs+ppo"):
        policy = stages.run("rejection-sampling", rejection_sampling_task, cfg.rejection_sampling,
                            RSInputs(policy=policy, reward_helpfulness=rm_h, reward_safety=rm_s,
                                     prompts=data["prompts"]), stages.dir("rejection-sampling"))["final"]
    if method in ("ppo", "rs+ppo"):
        policy = stages.run("ppo", ppo_task, cfg.ppo, PPOInputs(policy=policy, reward_helpfulness=rm_h,
                                                                reward_safety=rm_s, prompts=data["prompts"]),
                            stages.dir("ppo"))["final"]
    added = after_rlhf(stages, policy, data["prompts"], rm_s, rm_h,  # context distillation, GAtt: when enabled
                       instruction_demos=data.get("instruction_demos"))
    policy = list(policies({"policy": policy, **added}).values())[-1]
    previous = {"previous": start.policy} if start.round else {}
    ev = stages.run("eval", eval_task, cfg.eval, EvalInputs(
        checkpoints={"sft": sft, **previous, "candidate": policy}, baseline="previous" if previous else "sft",
        compare_to=["sft"] if previous else [], prompts=data["eval"], reward_helpfulness=rm_h, reward_safety=rm_s),
        stages.dir("eval"))
    seconds = {name: res.get("duration_s", 0.0) for name, res in stages.results.items()}
    record = lib.RoundRecord.model_validate(gate_task(plan, r, start, policy, rms, split["preferences"], before,
                                                      after, ev, pairs, seconds))
    say(f"round {r}: {'promoted' if record.promoted else 'not promoted'} ("
        + "; ".join(c["why"] for c in record.gate["checks"]) + ")")
    rounds_report_task(plan)
    return record
