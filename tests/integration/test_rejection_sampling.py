"""Rejection-sampling fine-tuning on the micro demo world: best-of-K beats the average, the fine-tuned model
loads, the stage directory is complete, and a re-run reuses the saved samples instead of sampling again."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama2_align.pipeline import preset_config
from llama2_align.stages.rejection_sampling import (KEPT_FILE, SAMPLES_FILE, RejectionSamplingConfig, RSInputs,
                                                    run_rejection_sampling)

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

K, PROMPTS = 4, 32


def _config() -> RejectionSamplingConfig:
    base = preset_config("demo-tiny").rejection_sampling.model_dump()
    base.update(k=K, max_prompts=PROMPTS, num_samples=3)
    base["sft"].update(max_steps=6, batch_size=16, micro_batch_size=16, learning_rate=1e-3, logging_steps=2,
                       eval_steps=1000, save_steps=3, num_samples=1, sample_max_new_tokens=8, progress_bar=False)
    return RejectionSamplingConfig.model_validate(base)


@pytest.fixture(scope="module")
def rs_run(tmp_path_factory, demo_world_dir, sft_dir, rm_dirs):
    inputs = RSInputs(policy=str(sft_dir / "final"), reward_helpfulness=str(rm_dirs["helpfulness"] / "final"),
                      reward_safety=str(rm_dirs["safety"] / "final"),
                      prompts=str(demo_world_dir / "ppo_prompts.jsonl"))
    out = tmp_path_factory.mktemp("rs")
    return out, inputs, run_rejection_sampling(_config(), inputs, out)


def test_kept_samples_beat_the_average(rs_run):
    out, _, result = rs_run
    m = result.metrics
    print(f"\nRS micro: combined reward all {m['reward_all_mean']:.3f} -> kept {m['reward_kept_mean']:.3f} "
          f"(safety {m['reward_all_mean_safety']} -> {m['reward_kept_mean_safety']}, "
          f"helpful {m['reward_all_mean_helpful']} -> {m['reward_kept_mean_helpful']})")
    assert m["prompts"] == PROMPTS and m["samples"] == PROMPTS * K and 0 < m["kept"] <= PROMPTS
    assert m["reward_kept_mean"] >= m["reward_all_mean"]
    for split in ("_safety", "_helpful"):
        if m[f"reward_kept_mean{split}"] is not None:
            assert m[f"reward_kept_mean{split}"] >= m[f"reward_all_mean{split}"] - 1e-9
    assert 0 < m["prompts_safety"] < PROMPTS  # both splits are present in the seeded subset

    doc = json.loads((out / SAMPLES_FILE).read_text())
    for p in doc["prompts"]:
        assert len(p["samples"]) == K
        if p["kept"] is not None:
            kept = p["samples"][p["kept"]]
            cands = [s for s in p["samples"] if s["response"].strip() and (s["finished"] or not any(
                t["finished"] and t["response"].strip() for t in p["samples"]))]
            assert kept["reward_combined"] == max(s["reward_combined"] for s in cands)
    # the combined reward is PPO's: Rs on safety prompts
    for p in doc["prompts"]:
        for s in p["samples"]:
            rs = 1 / (1 + math.exp(-s["rm_safety"]))
            rh = 1 / (1 + math.exp(-s["rm_helpfulness"]))
            want = rs if p["is_safety"] or rs < 0.15 else rh
            assert s["reward_combined"] == pytest.approx(want, abs=1e-5)


def test_stage_directory_and_fine_tuned_model(rs_run):
    from llama2_align.data import read_records
    from llama2_align.model import build_model

    out, _, result = rs_run
    assert (out / "result.json").exists()
    saved = json.loads((out / "result.json").read_text())
    assert saved["stage"] == "rejection-sampling" and saved["final"] == str(out / "final")
    assert saved["config"]["k"] == K and saved["provenance"]["resumed_from"] is None
    assert (out / "sft" / "result.json").exists() and result.steps == 6
    model = build_model(out / "final", "policy", device="cpu", dtype="fp32")
    assert sum(p.numel() for p in model.parameters()) > 0
    kept = read_records(str(out / KEPT_FILE), "sft")
    assert len(kept) == result.metrics["kept"]
    assert (out / "reward_distribution.png").stat().st_size > 1000
    assert result.artifacts["reward_distribution"] == "reward_distribution.png"
    show = json.loads((out / "samples.json").read_text())
    assert len(show) == 3 and all(len(p["samples"]) == K and "kept" in p for p in show)
    assert all({"response", "rm_helpfulness", "rm_safety", "reward_combined"} <= set(s)
               for p in show for s in p["samples"])


def test_rerun_reuses_samples_and_result(rs_run, monkeypatch):
    from llama2_align.stages import rejection_sampling as rs

    out, inputs, first = rs_run
    assert run_rejection_sampling(_config(), inputs, out).model_dump() == first.model_dump()  # result.json: done
    # A crash after sampling (no result.json yet): the re-run must reuse the samples file, not sample again.
    (out / "result.json").unlink()
    before = (out / SAMPLES_FILE).stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(rs, "sample_and_score", boom)
    again = run_rejection_sampling(_config(), inputs, out)
    assert (out / SAMPLES_FILE).stat().st_mtime_ns == before
    assert again.provenance["resumed_from"] == str(out / SAMPLES_FILE)
    assert again.metrics["reward_kept_mean"] == first.metrics["reward_kept_mean"]
    assert (out / "result.json").exists()
