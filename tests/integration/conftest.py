"""Session-wide fixtures for the integration tests: one micro demo world, its tokenizer, a short SFT and both
reward models, built once and shared (read-only) by every integration module (PPO, rejection sampling,
evaluation, pipeline). Tests that train further write into their own tmp directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.integration.helpers import _env

from llama2_align.pipeline import preset_config

# The micro SFT is trained a little longer than the smoke tests' 12 steps so its samples end with EOS often and
# PPO has a policy that responds to the reward signal.
SFT_STEPS = 150
RM_STEPS = 30
TOKENIZER_VOCAB = 512


@pytest.fixture(scope="session")
def demo_world_dir(tmp_path_factory) -> Path:
    """The micro demo world as JSONL: sft.jsonl, preferences.jsonl, ppo_prompts.jsonl, eval.jsonl."""
    from llama2_align.demo_world import DemoSizes, write_demo_datasets

    out = tmp_path_factory.mktemp("demo_world")
    write_demo_datasets(out, seed=0, sizes=DemoSizes.micro())
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from llama2_align.demo_world import DemoSizes, generate_demo_world
    from llama2_align.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return Path(train_tokenizer(generate_demo_world(0, DemoSizes.micro()).corpus_texts(), out,
                                vocab_size=TOKENIZER_VOCAB))


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory, demo_world_dir, tokenizer_dir) -> Path:
    """A finished SFT stage directory (full weights, micro preset); the model is ``<sft_dir>/final``."""
    from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft

    torch.set_num_threads(1)
    cfg = SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": SFT_STEPS,
                                    "batch_size": 16, "micro_batch_size": 16, "logging_steps": 10,
                                    "eval_steps": 1000, "save_steps": 1000, "num_samples": 2,
                                    "sample_max_new_tokens": 8, "progress_bar": False})
    out = tmp_path_factory.mktemp("sft")
    run_sft(cfg, SFTInputs(base="micro", data=str(demo_world_dir / "sft.jsonl"), tokenizer=str(tokenizer_dir)), out)
    return out


@pytest.fixture(scope="session")
def rm_dirs(tmp_path_factory, demo_world_dir, sft_dir) -> dict[str, Path]:
    """Finished reward-model stage directories, kind ("helpfulness", "safety") -> stage dir (model in final/)."""
    from llama2_align.stages.reward import RewardConfig, RewardInputs, run_reward

    torch.set_num_threads(1)
    out = {}
    for kind in ("helpfulness", "safety"):
        cfg = RewardConfig.model_validate({**preset_config("demo-tiny").reward_helpfulness.model_dump(), "kind": kind,
                                           "max_steps": RM_STEPS,
                                           "batch_size": 16, "micro_batch_size": 16, "logging_steps": 4,
                                           "eval_steps": 1000, "save_steps": 1000, "min_warmup_steps": 1,
                                           "progress_bar": False})
        d = tmp_path_factory.mktemp(f"rm_{kind}")
        run_reward(cfg, RewardInputs(sft_model=str(sft_dir / "final"), data=str(demo_world_dir / "preferences.jsonl")),
                   d)
        out[kind] = d
    return out


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """A PREFECT_HOME with a migrated database (migrating is a one-off 10-20 s, as on a user's first run)."""
    home = tmp_path_factory.mktemp("prefect-home")
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=_env(home),
                   check=True, capture_output=True, timeout=300)
    return home
