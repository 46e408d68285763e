"""The PPO stage end to end on the micro demo world: the reward rises while the KL to the reference stays bounded,
stable metric names, sample rows, the NaN guard, resume after a real SIGKILL, and a LoRA policy."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llama2_align.pipeline import preset_config
from llama2_align.stages.common import checkpoints
from llama2_align.stages.ppo import NonFiniteError, PPOConfig, PPOInputs, run_ppo

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

# Every name metrics.jsonl carries on every iteration (dashboards and the tasks' artifacts rely on them).
STABLE_METRICS = (
    "iteration", "step", "rm_helpfulness", "rm_safety", "rm_helpfulness_prob", "rm_safety_prob", "reward_combined",
    "reward_score", "kl_ref", "entropy", "clip_frac", "approx_kl", "policy_loss", "value_loss", "value_clip_frac",
    "explained_variance", "response_length", "no_eos_frac", "early_stopped", "time_rollout_s", "time_scoring_s",
    "time_optim_s", "time_iteration_s",
)
LEARN_ITERATIONS = 40
WINDOW = 5  # iterations averaged at each end of the run


def _config(**overrides) -> PPOConfig:
    # micro preset with a high learning rate: 40 iterations of 64 prompts move the reward well past its noise
    # (about ±0.03 per iteration) in ~25 s on one CPU thread.
    base = {**preset_config("demo-tiny").ppo.model_dump(), "learning_rate": 3e-4, "save_every": 1000,
            "sample_every": 10, "num_samples": 4}
    return PPOConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def ppo_inputs(demo_world_dir, sft_dir, rm_dirs) -> PPOInputs:
    return PPOInputs(policy=str(sft_dir / "final"), reward_helpfulness=str(rm_dirs["helpfulness"] / "final"),
                     reward_safety=str(rm_dirs["safety"] / "final"),
                     prompts=str(demo_world_dir / "ppo_prompts.jsonl"))


@pytest.fixture(scope="module")
def learned(tmp_path_factory, ppo_inputs):
    out = tmp_path_factory.mktemp("ppo_learn")
    seen = []
    result = run_ppo(_config(iterations=LEARN_ITERATIONS), ppo_inputs, out, progress=seen.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, result, rows, seen


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_reward_rises_while_kl_stays_bounded(learned):
    out, result, rows, _ = learned
    first, last = _mean(rows[:WINDOW], "reward_combined"), _mean(rows[-WINDOW:], "reward_combined")
    kls = [r["kl_ref"] for r in rows]
    print(f"\nPPO micro: reward_combined first {WINDOW} = {first:.3f}, last {WINDOW} = {last:.3f}; "
          f"kl_ref first = {kls[0]:.3f}, max = {max(kls):.3f}, "
          f"last {WINDOW} mean = {_mean(rows[-WINDOW:], 'kl_ref'):.3f}")
    assert last > first + 0.03, (first, last)
    assert all(math.isfinite(k) for k in kls)
    assert abs(kls[0]) < 0.5  # the first rollout comes from the reference itself
    assert max(kls) < 20.0  # nats per response: moving, but tied to the reference by the KL penalty
    assert result.metrics["reward_combined_first"] == pytest.approx(_mean(rows[:3], "reward_combined"))
    assert result.metrics["iterations"] == LEARN_ITERATIONS


def test_metrics_have_every_stable_name_each_iteration(learned):
    out, result, rows, seen = learned
    assert [r["iteration"] for r in rows] == list(range(1, LEARN_ITERATIONS + 1))
    for r in rows:
        missing = [k for k in STABLE_METRICS if k not in r]
        assert not missing, (r["iteration"], missing)
        assert 0 <= r["clip_frac"] <= 1 and 0 <= r["no_eos_frac"] <= 1 and r["response_length"] >= 1
    assert [p["step"] for p in seen] == list(range(1, LEARN_ITERATIONS + 1))
    assert all(p["stage"] == "ppo" and p["total"] == LEARN_ITERATIONS for p in seen)


def test_stage_directory_and_samples(learned):
    out, result, rows, _ = learned
    assert (out / "result.json").exists() and (out / "final" / "config.json").exists()
    assert (out / "value").is_dir() and (out / "curves.png").stat().st_size > 0
    assert result.artifacts == {"curves": "curves.png", "samples": "samples.json"}
    samples = json.loads((out / "samples.json").read_text())
    assert {s["iteration"] for s in samples} == {10, 20, 30, 40}
    assert len(samples) == 4 * 4
    for s in samples:
        assert {"prompt", "response", "rm_helpfulness", "rm_safety", "reward_combined", "is_safety"} <= set(s)
        assert isinstance(s["prompt"], str) and s["prompt"] and isinstance(s["response"], str)
        assert 0 < s["reward_combined"] < 1 and isinstance(s["is_safety"], bool)
        assert math.isfinite(s["rm_helpfulness"]) and math.isfinite(s["rm_safety"])
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["iterations"] == LEARN_ITERATIONS and saved["provenance"]["resumed_from"] is None


def test_nan_reward_stops_with_the_iteration_and_quantity(tmp_path, ppo_inputs, monkeypatch):
    from llama2_align.stages import reward as reward_stage

    real = reward_stage.RewardScorer.score_ids

    def nan_helpfulness(self, sequences):
        scores = real(self, sequences)
        if "rm_helpfulness" in self.path:
            scores[0] = float("nan")
        return scores

    monkeypatch.setattr(reward_stage.RewardScorer, "score_ids", nan_helpfulness)
    out = tmp_path / "ppo_nan"
    with pytest.raises(NonFiniteError) as err:
        run_ppo(_config(iterations=3), ppo_inputs, out)
    msg = str(err.value)
    assert "iteration 1" in msg and "rm_helpfulness" in msg, msg
    assert not (out / "final").exists() and not (out / "result.json").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_rollout_logprobs_stand_in_for_a_second_forward_pass(tmp_path, ppo_inputs):
    """fp32: the old log-probs recorded while sampling give the same iteration as recomputing them with a full
    forward pass (same rollouts, same KL, same losses), so the default may skip that pass."""
    rows = {}
    for reuse in (True, False):
        out = tmp_path / f"reuse-{reuse}"
        run_ppo(_config(iterations=1, rollout_logprobs=reuse), ppo_inputs, out)
        rows[reuse] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    a, b = rows[True], rows[False]
    assert a["reward_combined"] == b["reward_combined"] and a["response_length"] == b["response_length"]
    for key in ("kl_ref", "policy_loss", "value_loss", "approx_kl", "clip_frac", "entropy"):
        assert math.isclose(a[key], b[key], rel_tol=1e-3, abs_tol=1e-5), (key, a[key], b[key])


def test_target_kl_stops_the_epochs_early(tmp_path, ppo_inputs):
    """Past target_kl an iteration stops its PPO epochs (flagged in the metrics); with none it never does."""
    for target, stopped in ((1e-12, True), (None, False)):
        out = tmp_path / f"kl-{target}"
        run_ppo(_config(iterations=1, ppo_epochs=3, target_kl=target), ppo_inputs, out)
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert row["early_stopped"] is stopped


RESUME_ITERATIONS = 8

_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from llama2_align.stages.ppo import PPOConfig, PPOInputs, run_ppo
    cfg = PPOConfig.model_validate_json(sys.argv[1])
    inputs = PPOInputs.model_validate_json(sys.argv[2])
    run_ppo(cfg, inputs, sys.argv[3])
""")


def test_resume_after_sigkill(tmp_path, ppo_inputs):
    cfg = _config(iterations=RESUME_ITERATIONS, save_every=2, keep_checkpoints=2, sample_every=1, num_samples=2)
    out = tmp_path / "ppo_resume"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, cfg.model_dump_json(), ppo_inputs.model_dump_json(),
                             str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 75
        while not checkpoints(out):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 75 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists(), "the child finished before it was killed"
    step, ckpt = checkpoints(out)[-1]
    assert step >= 2 and step < RESUME_ITERATIONS

    seen = []
    result = run_ppo(cfg, ppo_inputs, out, progress=seen.append)
    assert seen[0]["step"] == step + 1  # nothing trained twice: training restarts right after the checkpoint
    assert result.steps == RESUME_ITERATIONS and result.metrics["iterations"] == RESUME_ITERATIONS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["iteration"] for r in rows] == list(range(1, RESUME_ITERATIONS + 1))
    samples = json.loads((out / "samples.json").read_text())
    assert sorted({s["iteration"] for s in samples}) == list(range(1, RESUME_ITERATIONS + 1))
    assert len(samples) == 2 * RESUME_ITERATIONS  # no duplicated sample rows from the killed run
    saved = json.loads((out / "result.json").read_text())
    assert saved["provenance"]["resumed_from"] == str(ckpt)
    assert Path(saved["provenance"]["resumed_from"]).name == f"checkpoint-{step}"
    assert (out / "final" / "config.json").exists()
    assert not (out / ".staging").exists()  # the checkpoints' staging area goes once the stage is complete


def test_lora_policy_saves_a_loadable_adapter(tmp_path, ppo_inputs):
    from llama2_align.model import build_model, is_peft, read_model_meta

    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = _config(iterations=2, prompts_per_iteration=16, mini_batch_size=16, micro_batch_size=16, lora=lora,
                  save_every=1, keep_checkpoints=1)
    out = tmp_path / "ppo_lora"
    result = run_ppo(cfg, ppo_inputs, out)
    final = out / "final"
    assert (final / "adapter_config.json").exists() and not (final / "config.json").exists()
    assert read_model_meta(final)["base"] == str(Path(ppo_inputs.policy).resolve())
    model = build_model(final, "policy", device="cpu", dtype="fp32")
    assert is_peft(model)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert abs(rows[0]["kl_ref"]) < 1e-3  # adapters start at zero: the policy IS the reference at first
    assert result.metrics["iterations"] == 2


class _Payload:
    """A pickle that runs code when it is unpickled: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_poisoned_or_corrupt_checkpoint_is_never_loaded(tmp_path, ppo_inputs):
    """A pickle payload planted in the newest PPO checkpoint does not run on resume: the checkpoint is set aside
    with a warning and the one before it is used; a truncated one the same. No pickle is ever unpickled."""
    import pickle

    cfg = _config(iterations=4, save_every=1, keep_checkpoints=3, prompts_per_iteration=16, mini_batch_size=16,
                  micro_batch_size=16, max_new_tokens=8, num_samples=0)
    out = tmp_path / "ppo_poisoned"
    run_ppo(cfg, ppo_inputs, out)
    assert [s for s, _ in checkpoints(out)] == [1, 2, 3]
    for name in ("result.json", "final", "value"):  # as if the run had been killed after its third checkpoint
        target = out / name
        target.unlink() if target.is_file() else __import__("shutil").rmtree(target)
    marker = tmp_path / "payload-ran"
    with open(out / "checkpoint-3" / "rng-rank0.pt", "wb") as f:
        pickle.dump(_Payload(marker), f)
    shard = next((out / "checkpoint-2" / "models").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])

    seen = []
    result = run_ppo(cfg, ppo_inputs, out, progress=seen.append)
    assert not marker.exists(), "the planted pickle payload ran"
    warnings = [e["warning"] for e in seen if "warning" in e]
    assert any("checkpoint-3 is corrupt" in w and "rng-rank0.pt" in w and "checkpoint-1" in w for w in warnings)
    assert any("checkpoint-2 is corrupt" in w and "distcp is truncated" in w for w in warnings), warnings
    assert (out / "corrupt-checkpoint-3").is_dir() and (out / "corrupt-checkpoint-2").is_dir()
    assert result.provenance["resumed_from"].endswith("checkpoint-1") and result.steps == 4
    assert [e["step"] for e in seen if "warning" not in e][0] == 2  # resumed right after checkpoint-1
