"""The whole rlhf-pipeline flow on the demo-micro preset under Prefect: report.json layout, then a cached re-run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.helpers import task_states

pytestmark = pytest.mark.slow

STAGES = ("sft", "reward-helpfulness", "reward-safety", "ppo", "eval", "export")



def test_pipeline_micro_runs_reports_and_caches(prefect_server, tmp_path):
    import torch
    from prefect import get_client  # noqa: F401

    from flows.pipeline import rlhf_pipeline
    from llama2_align.pipeline import PipelineConfig

    torch.set_num_threads(1)
    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="micro", export=True)
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    report = json.loads((tmp_path / "micro" / "report.json").read_text())
    for name in STAGES:
        s = report["stages"][name]
        assert s["status"] == "completed" and s["duration_s"] is not None and s["output"]
        assert isinstance(s["metrics"], dict)
    for ckpt in ("sft", "ppo"):
        for key in ("helpfulness_accuracy", "violation_rate", "false_refusal_rate", "rm_helpfulness", "rm_safety",
                    "win_rate_vs_baseline"):
            assert key in report["eval"][ckpt]
    assert "demo_bar" in report and out["report_md"].endswith("report.md")
    export = tmp_path / "micro" / "export"  # the optional export step: the PPO policy as HF and GGUF
    assert (export / "hf" / "model.safetensors").exists() and (export / "model-f16.gguf").stat().st_size > 0
    first = task_states(state.state_details.flow_run_id, STAGES)
    assert all(first[n] == "Completed" for n in STAGES), first

    again = rlhf_pipeline(config=cfg, return_state=True)
    assert again.is_completed(), again.message
    states = task_states(again.state_details.flow_run_id, STAGES)
    assert all(states[n] == "Cached" for n in STAGES), states

    # the same run name on another demo seed: refused before anything runs, the finished run's data kept
    data = tmp_path / "micro" / "data"
    assert json.loads((data / "demo_settings.json").read_text())["demo_seed"] == 0
    written = (data / "sft.jsonl").stat().st_mtime_ns
    other = rlhf_pipeline(config=PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="micro",
                                                export=True, overrides={"data.demo_seed": 1}), return_state=True)
    assert other.is_failed() and "demo data made with other settings (data.demo_seed)" in other.message
    assert (data / "sft.jsonl").stat().st_mtime_ns == written

    # the finished run copied to branch from it, the original deleted, the copy's evaluation removed: the copy runs,
    # every stage read from the copy (the evaluation loads the copy's SFT and PPO checkpoints)
    shutil.copytree(tmp_path / "micro", tmp_path / "copy")
    shutil.rmtree(tmp_path / "micro")
    shutil.rmtree(tmp_path / "copy" / "eval")
    branch = rlhf_pipeline(config=PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="copy",
                                                 export=True), return_state=True)
    assert branch.is_completed(), branch.message
    report = json.loads((tmp_path / "copy" / "report.json").read_text())
    for name in STAGES:
        assert Path(report["stages"][name]["output"]).resolve().is_relative_to((tmp_path / "copy").resolve()), name
    assert not (tmp_path / "micro").exists()


def test_pipeline_names_the_failing_stage(prefect_server, tmp_path):
    from flows.pipeline import rlhf_pipeline
    from llama2_align.pipeline import PipelineConfig

    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="bad",
                         overrides={**QUICK, "ppo.learning_rate": 1e30})  # PPO diverges: NaN at run time
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    assert "stage 'ppo' failed" in state.message and "NaN" in state.message
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["stages"]["ppo"]["status"] == "failed" and report["stages"]["sft"]["status"] == "completed"
    assert "eval" not in report["stages"]


SPECS = Path(__file__).resolve().parents[2] / "data_specs"
# demo-micro cut to a few steps per stage: these tests are about the wiring, not the learning
QUICK = {"sft.max_steps": 4, "sft.eval_steps": 2, "sft.save_steps": 2, "reward_helpfulness.max_steps": 2,
         "reward_safety.max_steps": 2, "ppo.iterations": 2, "eval.max_new_tokens": 8}


def test_your_own_files_run_end_to_end_on_a_demo_preset(prefect_server, tmp_path, tokenizer_dir):
    """data_specs/'s native samples with a demo preset: the eval records carry no demo-world oracle, so the refusal
    rules and the reward models judge."""
    from flows.pipeline import rlhf_pipeline
    from llama2_align.pipeline import PipelineConfig

    data = {"source": "files", "sft": str(SPECS / "sft.sample.jsonl"),
            "preferences": str(SPECS / "preference.sample.jsonl"), "prompts": str(SPECS / "prompts.sample.jsonl"),
            "eval": str(SPECS / "eval.sample.jsonl"), "tokenizer": str(tokenizer_dir)}
    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="byo", data=data, overrides=QUICK)
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    report = json.loads((tmp_path / "byo" / "report.json").read_text())
    assert report["eval_rules"]["refusal"].startswith("refusal rules")
    assert report["eval"]["ppo"]["violation_rate"] is not None and "demo_bar" not in report


def test_your_own_files_run_end_to_end_on_a_llama2_preset(prefect_server, tmp_path, tokenizer_dir):
    """A llama2-* preset (LoRA, the paper's recipe) pointed at a small local HF checkpoint, with HH-RLHF's and
    PKU-SafeRLHF's own formats as the preference data."""
    from flows.pipeline import rlhf_pipeline
    from llama2_align.model import build_model, save_model
    from llama2_align.pipeline import PipelineConfig
    from llama2_align.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    base = save_model(build_model("micro", "policy", vocab_size=len(tok), device="cpu", dtype="fp32"),
                      tmp_path / "llama-2-micro-hf", tok, role="policy")
    data = {"source": "files", "sft": str(SPECS / "sft.sample.jsonl"),
            "preferences": [str(SPECS / "hh_rlhf.sample.jsonl"), str(SPECS / "pku_saferlhf.sample.jsonl")],
            "prompts": str(SPECS / "prompts.sample.jsonl"), "eval": str(SPECS / "eval.sample.jsonl")}
    small = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "max_length": 256}
    overrides = {**{f"sft.{k}": v for k, v in small.items()},
                 **{f"reward_{kind}.{k}": v for kind in ("helpfulness", "safety") for k, v in small.items()},
                 **{f"ppo.{k}": v for k, v in {"iterations": 2, "prompts_per_iteration": 4, "mini_batch_size": 4,
                                                "micro_batch_size": 4, "max_new_tokens": 8,
                                                "generation_batch_size": 4, "score_batch_size": 4}.items()},
                 "eval.max_new_tokens": 8, "eval.batch_size": 8}
    cfg = PipelineConfig(preset="llama2-7b-lora", base_model=str(base), runs_root=str(tmp_path), run_name="byo7b",
                         data=data, overrides=overrides)
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    run = tmp_path / "byo7b"
    report = json.loads((run / "report.json").read_text())
    assert set(report["eval"]) == {"sft", "ppo"}
    assert (run / "sft" / "final" / "adapter_config.json").exists()  # the preset's LoRA
    rm = json.loads((run / "reward-safety" / "result.json").read_text())
    assert rm["metrics"]["train_pairs_by_category"]["safety"] > 0


def test_pipeline_with_rejection_sampling(prefect_server, tmp_path):
    """SFT -> RS -> PPO: the RS stage runs, its model feeds PPO, and evaluation covers sft, rs and ppo. The reward
    models train concurrently here (worker processes, the GPU machines' default), so that path runs too."""
    from flows.pipeline import rlhf_pipeline
    from llama2_align.pipeline import PipelineConfig

    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="rs", rejection_sampling=True,
                         concurrent_reward_models=True,
                         overrides={"rejection_sampling.max_prompts": 16, "rejection_sampling.k": 2})
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    report = json.loads((tmp_path / "rs" / "report.json").read_text())
    assert report["stages"]["rejection-sampling"]["status"] == "completed"
    assert set(report["eval"]) == {"sft", "rs", "ppo"}
    ppo_inputs = json.loads((tmp_path / "rs" / "ppo" / "result.json").read_text())["inputs"]
    assert ppo_inputs["policy"]["path"].endswith("rejection-sampling/final")
    states = task_states(state.state_details.flow_run_id, ("rejection-sampling", "reward-helpfulness", "reward-safety"))
    assert states["rejection-sampling"] == "Completed"
    assert states["reward-helpfulness"] == states["reward-safety"] == "Completed"
    for kind in ("helpfulness", "safety"):
        assert report["stages"][f"reward-{kind}"]["status"] == "completed"
