"""Run the PPO stage alone, from paths: ``flows/ppo.py:ppo`` (deployed as ``ppo``)."""

from __future__ import annotations

from prefect import flow

from llama2_align.pipeline import preset_config
from llama2_align.stages.ppo import PPOConfig, PPOInputs
from tasks.ppo import ppo_task


@flow(name="ppo", log_prints=True)
def ppo(policy: str, reward_helpfulness: str, reward_safety: str, prompts: str, out_dir: str = "runs/demo/ppo",
        config: PPOConfig = preset_config("demo-tiny").ppo) -> dict:
    """Optimise ``policy`` (an SFT or rejection-sampling ``final`` directory) with PPO against the helpfulness and
    safety reward models on the prompts in ``prompts``; checkpoints go to ``out_dir``."""
    return ppo_task(config, PPOInputs(policy=policy, reward_helpfulness=reward_helpfulness,
                                      reward_safety=reward_safety, prompts=prompts), out_dir)
