"""The stages that come after RLHF, in the paper's order: safety context distillation after PPO, then Ghost
Attention, each on the policy the previous one produced. Each is off unless its config enables it. A pipeline (or a
round of ``rlhf-rounds``) calls :func:`after_rlhf` with its latest policy and adds the checkpoints it returns to its
evaluation; :func:`adherence` runs the multi-turn evaluation when GAtt ran (or when it is enabled on its own)."""

from __future__ import annotations

from flows.common import Stages
from llama2_align.stages.adherence import AdherenceInputs
from llama2_align.stages.context_distillation import ContextDistillationInputs
from llama2_align.stages.gatt import GAttInputs, uses_safety_rm
from tasks.adherence import adherence_task
from tasks.context_distillation import context_distillation_task
from tasks.gatt import gatt_task


UNTARGETED = "cd-untargeted"  # a comparison checkpoint, never a policy the recipe goes on from


def policies(checkpoints: dict[str, str]) -> dict[str, str]:
    """The policy checkpoints in recipe order, without the untargeted context-distillation comparison; the last one
    is the run's final policy."""
    return {k: v for k, v in checkpoints.items() if k != UNTARGETED}


def after_rlhf(stages: Stages, policy: str, prompts: str, reward_safety: str, reward_helpfulness: str,
               prefix: str = "", instruction_demos: str | None = None) -> dict[str, str]:
    """Run the enabled post-RLHF stages from ``policy``; returns the new checkpoints, in order (``cd``, and
    ``cd-untargeted`` when compared, ``gatt``). ``prefix`` names a round's stage directories (``round-2/``);
    ``instruction_demos``: the data's instruction demonstrations, for GAtt's ``demonstrations``."""
    cfg, out = stages.cfg, {}
    if cfg.context_distillation.enabled:
        cd = stages.run(f"{prefix}context-distillation", context_distillation_task, cfg.context_distillation,
                        ContextDistillationInputs(policy=policy, prompts=prompts, reward_safety=reward_safety),
                        stages.dir(f"{prefix}context-distillation"))
        out["cd"] = policy = cd["final"]
        if cd["metrics"].get("untargeted_final"):
            out[UNTARGETED] = cd["metrics"]["untargeted_final"]
    if cfg.gatt.enabled:
        # the safety RM only when it picks answers (safety turns): otherwise the stage's inputs stay as they were
        gatt = stages.run(f"{prefix}gatt", gatt_task, cfg.gatt,
                          GAttInputs(policy=policy, prompts=prompts, reward_helpfulness=reward_helpfulness,
                                     reward_safety=reward_safety if uses_safety_rm(cfg.gatt) else None,
                                     demonstrations=instruction_demos if cfg.gatt.demonstrations else None),
                          stages.dir(f"{prefix}gatt"))
        out["gatt"] = gatt["final"]
    return out


def adherence(stages: Stages, checkpoints: dict[str, str], eval_prompts: str, reward_helpfulness: str,
              prefix: str = "") -> dict | None:
    """The multi-turn evaluation of every policy checkpoint (the untargeted comparison aside), against the policy
    GAtt started from; None when neither GAtt nor the evaluation itself is enabled."""
    cfg = stages.cfg
    if not cfg.runs_adherence():
        return None
    kept = policies(checkpoints)
    names = list(kept)
    baseline = names[names.index("gatt") - 1] if "gatt" in names and len(names) > 1 else names[0]
    return stages.run(f"{prefix}adherence", adherence_task, cfg.adherence,
                      AdherenceInputs(checkpoints=kept, baseline=baseline, prompts=eval_prompts,
                                      reward_helpfulness=reward_helpfulness), stages.dir(f"{prefix}adherence"))
