"""Stages under torchrun (``llama2_align.launch``): 2 CPU processes with gloo, the micro preset, a few steps.

SFT, both reward models and PPO run as subprocesses through ``launch_stage``; the results must look exactly like a
single-process run (rank 0 alone wrote), the log callback must see the subprocess's lines, and a refused data file
must come back as an error naming the exit code and the validation message. The launched SFT and reward models are
built once for the module and reused by PPO, so the module needs no other fixture than the micro world and
tokenizer.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from llama2_align.launch import LaunchError, launch_stage, should_launch
from llama2_align.pipeline import preset_config
from llama2_align.stages.ppo import PPOConfig, PPOInputs
from llama2_align.stages.reward import RewardConfig, RewardInputs
from llama2_align.stages.sft import SFTConfig, SFTInputs

NPROC = 2
SFT_STEPS = 6
# What a finished SFT stage directory holds, launched or not (.launch/ holds the spec and torchrun's logs; .staging/,
# where checkpoints are assembled before they are renamed into place, is gone once result.json is written).
SFT_ENTRIES = {".launch", "checkpoint-3", "checkpoint-6", "final", "metrics.jsonl", "result.json",
               "samples.json", "curves.png"}


def _sft_config(**overrides) -> SFTConfig:
    return SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": SFT_STEPS,
                                     "batch_size": 16, "micro_batch_size": 8, "logging_steps": 1, "eval_steps": 3,
                                     "save_steps": 3, "num_samples": 2, "sample_max_new_tokens": 8,
                                     "progress_bar": False, "num_processes": NPROC, **overrides})


class Recorder:
    def __init__(self):
        self.lines: list[str] = []
        self.events: list[dict] = []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def progress(self, event: dict) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def launched_sft(tmp_path_factory, demo_world_dir, tokenizer_dir):
    out = tmp_path_factory.mktemp("sft_launched")
    rec = Recorder()
    t0 = time.perf_counter()
    result = launch_stage("sft", _sft_config(), SFTInputs(base="micro", data=str(demo_world_dir / "sft.jsonl"),
                                                          tokenizer=str(tokenizer_dir)),
                          out, NPROC, log=rec.log, progress=rec.progress)
    return out, result, rec, time.perf_counter() - t0


@pytest.fixture(scope="module")
def launched_rms(tmp_path_factory, demo_world_dir, launched_sft) -> dict[str, Path]:
    sft_out = launched_sft[0]
    dirs = {}
    for kind in ("helpfulness", "safety"):
        cfg = RewardConfig.model_validate({**preset_config("demo-tiny").reward_helpfulness.model_dump(), "kind": kind,
                                           "max_steps": 4,
                                           "batch_size": 16, "micro_batch_size": 8, "logging_steps": 2,
                                           "eval_steps": 1000, "save_steps": 1000, "min_warmup_steps": 1,
                                           "progress_bar": False, "num_processes": NPROC})
        d = tmp_path_factory.mktemp(f"rm_{kind}_launched")
        result = launch_stage(f"reward-{kind}", cfg, RewardInputs(sft_model=str(sft_out / "final"),
                                                                  data=str(demo_world_dir / "preferences.jsonl")),
                              d, NPROC, log=lambda line: None)
        assert result.stage == f"reward-{kind}" and result.provenance["world_size"] == NPROC
        assert (d / "final" / "model.safetensors").exists() and (d / "heldout_metrics.json").exists()
        dirs[kind] = d
    return dirs


# --------------------------------------------------------------------------------------------------------------------


def test_should_launch():
    assert not should_launch(_sft_config(num_processes=1))
    assert should_launch(_sft_config(num_processes=2))
    assert should_launch(preset_config("demo-tiny").ppo.model_copy(update={"num_processes": 4}))
    assert not should_launch(object())


def test_task_error_classification_of_launch_errors():
    """A launched stage's failures are classified like in-process ones: OOM is transient (and backs off), a refused
    input is a validation error (never retried), anything else is not retried."""
    from tasks.common import is_oom, is_transient, is_validation_error

    oom = LaunchError("sft: torchrun failed with exit code 1: rank 1 raised OutOfMemoryError: CUDA out of memory. "
                      "Tried to allocate 2.00 GiB", 1, {"rank": 1, "type": "OutOfMemoryError", "validation": False})
    assert is_oom(oom) and is_transient(oom) and not is_validation_error(oom)
    bad = LaunchError("sft: ... exit code 1: rank 0 raised DataValidationError: 2 data problems", 1,
                      {"rank": 0, "type": "DataValidationError", "validation": True})
    assert is_validation_error(bad) and not is_transient(bad)
    other = LaunchError("sft: ... exit code 1: rank 0 raised KeyError: 'x'", 1, {"type": "KeyError"})
    assert not is_transient(other) and not is_validation_error(other)


@pytest.mark.slow
def test_sft_under_torchrun_has_the_single_process_shape(launched_sft, monkeypatch):
    out, result, rec, elapsed = launched_sft
    print(f"2-process SFT ({SFT_STEPS} steps) took {elapsed:.1f}s")
    assert result.stage == "sft" and result.steps == SFT_STEPS
    assert result.provenance["world_size"] == NPROC
    assert json.loads((out / "result.json").read_text())["provenance"]["world_size"] == NPROC
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "config.json").exists()
    assert result.metrics["val_loss"] > 0 and result.metrics["train_loss_last"] > 0
    assert result.artifacts == {"samples": "samples.json", "curves": "curves.png"}

    # only rank 0 wrote: one line per logged step, nothing rank-suffixed or duplicated
    assert {p.name for p in out.iterdir()} == SFT_ENTRIES
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, SFT_STEPS + 1))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, SFT_STEPS]  # eval_on_start, then every 3
    assert len(json.loads((out / "samples.json").read_text())) == 2
    for ckpt in ("checkpoint-3", "checkpoint-6"):  # Trainer keeps one RNG state per rank, as it must for resume
        assert sorted(p.name for p in (out / ckpt).glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not (out / ".staging").exists()

    # the caller saw the subprocess: torchrun's lines tagged by rank, progress events from rank 0 only
    assert any(line.startswith("[rank0] ") for line in rec.lines)
    assert any(line.startswith("[rank1] ") for line in rec.lines)
    assert not any("@@llama2_align.progress" in line for line in rec.lines)
    assert sorted({e["step"] for e in rec.events}) == list(range(0, SFT_STEPS + 1))  # step 0: eval_on_start
    assert all(e["total"] == SFT_STEPS for e in rec.events)

    # complete: returned at once, nothing launched
    def no_launch(*args, **kwargs):
        raise AssertionError(f"launched {args[0] if args else kwargs}")

    monkeypatch.setattr("llama2_align.launch.subprocess.Popen", no_launch)
    again = Recorder()
    assert launch_stage("sft", _sft_config(), SFTInputs(base="micro", data="unused", tokenizer="unused"), out,
                        NPROC, log=again.log) == result
    assert again.lines == []


@pytest.mark.slow
def test_sft_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path, launched_sft, demo_world_dir, tokenizer_dir):
    """The Trainer's checkpoints hold the model and the optimizer as one DCP checkpoint (both ranks wrote into
    models/): the 2-process run, cut back to its step-3 checkpoint, resumes in ONE process and logs the same losses
    as the 2-process run did after it (same global batches, gradient accumulation in place of the second rank)."""
    from llama2_align.stages.sft import run_sft

    out = launched_sft[0]
    ckpt = out / "checkpoint-3"
    assert {"models", "scheduler.pt", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "model.safetensors").exists()
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (ckpt / "models").iterdir()}
    resumed = tmp_path / "sft"
    shutil.copytree(ckpt, resumed / ckpt.name)
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    result = run_sft(_sft_config(num_processes=1, num_samples=0), SFTInputs(
        base="micro", data=str(demo_world_dir / "sft.jsonl"), tokenizer=str(tokenizer_dir)), resumed)
    assert result.provenance["resumed_from"] == str(resumed / ckpt.name) and result.provenance["world_size"] == 1

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}
    two, one = losses(out), losses(resumed)
    assert sorted(one) == list(range(1, SFT_STEPS + 1))
    for step in range(4, SFT_STEPS + 1):
        assert one[step] == pytest.approx(two[step], rel=1e-4), (step, one[step], two[step])


@pytest.mark.slow
def test_ppo_under_torchrun(tmp_path, demo_world_dir, launched_sft, launched_rms):
    """2 processes, 2 iterations: each rank rolls out its half of the prompts, gradients are all-reduced, rank 0
    writes; a checkpoint holds the models and optimizers (DCP, both ranks' shards) and both ranks' RNG states."""
    cfg = PPOConfig.model_validate({**preset_config("demo-tiny").ppo.model_dump(), "iterations": 2,
                                    "prompts_per_iteration": 8, "mini_batch_size": 8, "micro_batch_size": 4,
                                    "ppo_epochs": 1, "max_new_tokens": 8, "save_every": 1, "keep_checkpoints": 1,
                                    "sample_every": 1, "num_samples": 2, "num_processes": NPROC})
    inputs = PPOInputs(policy=str(launched_sft[0] / "final"),
                       reward_helpfulness=str(launched_rms["helpfulness"] / "final"),
                       reward_safety=str(launched_rms["safety"] / "final"),
                       prompts=str(demo_world_dir / "ppo_prompts.jsonl"))
    rec = Recorder()
    t0 = time.perf_counter()
    result = launch_stage("ppo", cfg, inputs, tmp_path, NPROC, log=rec.log, progress=rec.progress)
    print(f"2-process PPO (2 iterations) took {time.perf_counter() - t0:.1f}s")
    assert result.stage == "ppo" and result.steps == 2 and result.provenance["world_size"] == NPROC
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "value" / "model.safetensors").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["response_length"] > 0 for r in records)
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert [s["iteration"] for s in samples] == [1, 1, 2, 2]
    ckpt = tmp_path / "checkpoint-1"  # the models and optimizers as one DCP checkpoint, RNG and loop state per rank
    assert sorted(p.name for p in ckpt.iterdir()) == ["loop-rank0.json", "loop-rank1.json", "models", "rng-rank0.pt",
                                                      "rng-rank1.pt"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (ckpt / "models").iterdir()}
    assert [e["step"] for e in rec.events] == [1, 2]


@pytest.mark.slow
def test_refused_data_fails_with_exit_code_and_message(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    out = tmp_path / "sft"
    rec = Recorder()
    with pytest.raises(RuntimeError) as info:
        launch_stage("sft", _sft_config(), SFTInputs(base="micro", data=str(bad), tokenizer=str(tokenizer_dir)),
                     out, NPROC, log=rec.log)
    exc = info.value
    text = str(exc)
    assert isinstance(exc, LaunchError) and exc.exit_code != 0
    assert f"exit code {exc.exit_code}" in text
    assert "DataValidationError" in text and "2 data problems" in text
    assert "the dialogue must end with assistant" in text and "expected valid JSON" in text
    assert exc.validation_error
    assert rec.lines  # the failure was streamed too
    assert not (out / "result.json").exists() and not (out / "final").exists()
