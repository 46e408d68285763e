"""SFT and reward models on the micro demo world: learning, the margin loss inside TRL, and SFT resume after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llama2_align.pipeline import preset_config

pytestmark = pytest.mark.slow


def test_sft_validation_loss_falls(sft_dir):
    metrics = json.loads((sft_dir / "result.json").read_text())["metrics"]
    assert metrics["train_loss_last"] < 0.6 * metrics["train_loss_first"]
    assert metrics["val_loss"] < metrics["val_loss_first"]


def test_helpfulness_rm_beats_chance_on_significantly_better_pairs(rm_dirs, tmp_path):
    """Judged on a world generated with another seed (prompts the RM never saw; the micro held-out split has only a
    handful of significantly-better pairs)."""
    from llama2_align.data import read_records
    from llama2_align.demo_world import DemoSizes, write_demo_datasets
    from llama2_align.stages.reward import RewardScorer, evaluate_pairs

    torch.set_num_threads(1)
    fresh = write_demo_datasets(tmp_path, seed=7, sizes=DemoSizes.micro())["preference"]
    pairs = [r for r in read_records(fresh, "preference")
             if r.category == "helpfulness" and r.rating == "significantly_better"]
    assert len(pairs) >= 30
    metrics = evaluate_pairs(RewardScorer(rm_dirs["helpfulness"] / "final", device="cpu", dtype="fp32"), pairs)
    assert metrics["accuracy"] >= 0.65, metrics["accuracy"]
    stage = json.loads((rm_dirs["helpfulness"] / "result.json").read_text())["metrics"]
    assert set(stage["accuracy_table"]) == {"helpfulness", "safety"}
    assert "unsafe_recall" in json.loads((rm_dirs["safety"] / "result.json").read_text())["metrics"]


def test_margin_loss_inside_trl_matches_hand_computed(tokenizer_dir):
    """The loss TRL's RewardTrainer computes on our tokenized pairs is -log σ(r_c - r_r - m(rating))."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from llama2_align.data import validate_records
    from llama2_align.model import build_model
    from llama2_align.stages.reward import tokenize_pairs
    from llama2_align.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    recs = validate_records([
        {"prompt": "What is 3 plus 4?", "chosen": "7", "rejected": "9", "rating": "significantly_better",
         "category": "helpfulness"},
        {"prompt": "Say the word river.", "chosen": "river", "rejected": "River.", "rating": "slightly_better",
         "category": "helpfulness"}], "preference")
    rows = tokenize_pairs(tok, recs, "small")
    assert [r["margin"] for r in rows] == pytest.approx([1.0, 1 / 3])
    model = build_model("micro", "reward", vocab_size=len(tok), device="cpu", dtype="fp32")
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir="/tmp/unused-rm", report_to="none",
                                                           use_cpu=True),
                            train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(rows)
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])

    def stub(**inputs):
        return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    loss = trainer.compute_loss(stub, dict(batch))
    expected = (-math.log(1 / (1 + math.exp(-(2.0 - 1.0 - 1.0))))
                - math.log(1 / (1 + math.exp(-(0.5 - 1.5 - 1 / 3))))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


RESUME_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
from llama2_align.pipeline import preset_config
from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft
cfg = SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": 40, "batch_size": 8,
                                "micro_batch_size": 8, "logging_steps": 1, "save_steps": 5, "eval_steps": 1000,
                                "num_samples": 0, "progress_bar": False, "keep_checkpoints": 3})
run_sft(cfg, SFTInputs(base="micro", data=sys.argv[1], tokenizer=sys.argv[2]), sys.argv[3])
"""


def test_sft_resumes_after_sigkill(tmp_path, demo_world_dir, tokenizer_dir):
    """A real process killed after its first checkpoint; the rerun resumes there and trains no step twice."""
    from llama2_align.stages.common import checkpoints
    from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft

    out = tmp_path / "sft"
    args = [str(demo_world_dir / "sft.jsonl"), str(tokenizer_dir), str(out)]
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, *args], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not checkpoints(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert checkpoints(out), "no checkpoint appeared before the deadline"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "result.json").exists()
    resumed_from = checkpoints(out)[-1]
    assert resumed_from[0] < 40

    torch.set_num_threads(1)
    cfg = SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": 40, "batch_size": 8,
                                    "micro_batch_size": 8, "logging_steps": 1, "save_steps": 5, "eval_steps": 1000,
                                    "num_samples": 0, "progress_bar": False, "keep_checkpoints": 3})
    result = run_sft(cfg, SFTInputs(base="micro", data=args[0], tokenizer=args[1]), out)
    assert result.steps == 40
    assert result.provenance["resumed_from"].endswith(resumed_from[1].name)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 41)), steps  # every step logged exactly once: none trained twice, none lost


def test_reward_model_warm_starts_from_init(tmp_path, demo_world_dir, sft_dir, rm_dirs):
    """``RewardInputs.init``: training starts from that reward model (score head included), not from SFT."""
    from safetensors.torch import load_file

    from llama2_align.stages.reward import RewardConfig, RewardInputs, run_reward

    torch.set_num_threads(1)
    cfg = RewardConfig.model_validate({**preset_config("demo-micro").reward_helpfulness.model_dump(), "max_steps": 1,
                                       "learning_rate": 1e-12, "batch_size": 8, "micro_batch_size": 8,
                                       "eval_steps": 1000, "save_steps": 1000, "min_warmup_steps": 0})
    init = rm_dirs["helpfulness"] / "final"
    result = run_reward(cfg, RewardInputs(sft_model=str(sft_dir / "final"), init=str(init),
                                          data=str(demo_world_dir / "preferences.jsonl")), tmp_path / "warm")
    before, after = load_file(init / "model.safetensors"), load_file(tmp_path / "warm" / "final" / "model.safetensors")
    assert torch.allclose(before["score.weight"], after["score.weight"], atol=1e-6)
    assert result.inputs["init"]["hash"].startswith("result:")  # the warm start is part of the input fingerprint


def test_a_finished_stage_is_reused_only_for_the_same_config_and_inputs(tmp_path, demo_world_dir, sft_dir):
    """A finished stage directory returns its result for the same settings (wherever the directory now lies, and
    whatever its progress bar), and refuses other settings with the fields named instead of passing off the old
    result as the new run's."""
    import shutil

    from llama2_align.stages.common import FinishedWithOtherSettings
    from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft

    done = json.loads((sft_dir / "result.json").read_text())
    cfg = SFTConfig.model_validate(done["config"])
    inputs = SFTInputs(base="micro", data=done["inputs"]["data"]["path"],
                       tokenizer=done["inputs"]["tokenizer"]["path"])
    assert run_sft(cfg, inputs, sft_dir).steps == done["steps"]
    assert run_sft(cfg.model_copy(update={"progress_bar": not cfg.progress_bar}), inputs, sft_dir).steps == \
        done["steps"]
    moved = tmp_path / "moved" / "sft"
    shutil.copytree(sft_dir, moved)
    assert run_sft(cfg, inputs, moved).duration_s == done["duration_s"]  # served, not re-run

    with pytest.raises(FinishedWithOtherSettings, match=r"config: learning_rate\)") as err:
        run_sft(cfg.model_copy(update={"learning_rate": cfg.learning_rate * 2}), inputs, moved)
    assert str(moved) in str(err.value) and "another run name" in str(err.value)
    fewer = tmp_path / "sft-fewer.jsonl"
    fewer.write_text("".join((demo_world_dir / "sft.jsonl").read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(FinishedWithOtherSettings, match=r"inputs changed: data\)"):
        run_sft(cfg, inputs.model_copy(update={"data": str(fewer)}), moved)
    assert json.loads((moved / "result.json").read_text()) == done  # untouched


def test_setting_differences_name_every_field_and_skip_how_a_stage_ran():
    from llama2_align.stages.common import _differences

    old = {"lr": 1e-3, "progress_bar": True, "lora": {"r": 8, "alpha": 16}, "gone": 1}
    new = {"lr": 1e-3, "progress_bar": False, "lora": {"r": 16, "alpha": 16}, "added": 2}
    assert _differences(old, new) == ["added (not recorded)", "gone (no longer a setting)", "lora.r"]
    assert _differences(old, dict(old, progress_bar=False, num_samples=3)) == []
    assert _differences({"enabled": True, "lora": {"enabled": False}}, {"enabled": False, "lora": {"enabled": True}}) \
        == ["lora.enabled"]  # whether a stage runs does not count; LoRA on or off does
