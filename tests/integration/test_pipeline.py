"""The whole rlhf-pipeline flow on the demo-micro preset under Prefect: report.json layout, then a cached re-run."""

from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.slow

STAGES = ("sft", "reward-helpfulness", "reward-safety", "ppo", "eval")


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name: r.state.name for r in runs}

    return asyncio.run(read())


def test_pipeline_micro_runs_reports_and_caches(prefect_server, tmp_path):
    import torch
    from prefect import get_client  # noqa: F401

    from flows.pipeline import rlhf_pipeline
    from llama2_align.pipeline import PipelineConfig

    torch.set_num_threads(1)
    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="micro")
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
    first = _task_states(state.state_details.flow_run_id)
    assert all(first[n] == "Completed" for n in STAGES), first

    again = rlhf_pipeline(config=cfg, return_state=True)
    assert again.is_completed(), again.message
    states = _task_states(again.state_details.flow_run_id)
    assert all(states[n] == "Cached" for n in STAGES), states


def test_pipeline_names_the_failing_stage(prefect_server, tmp_path):
    from flows.pipeline import rlhf_pipeline
    from llama2_align.pipeline import PipelineConfig

    bad = tmp_path / "bad_sft.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # ends with a user turn: refused
    good = tmp_path / "x.jsonl"
    good.write_text("")
    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="bad",
                         data={"source": "files", "sft": str(bad), "preferences": str(good), "prompts": str(good),
                               "eval": str(good), "tokenizer": str(tmp_path)})
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    assert "stage 'sft' failed" in state.message
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["stages"]["sft"]["status"] == "failed"
    assert "ppo" not in report["stages"]


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
    states = _task_states(state.state_details.flow_run_id)
    assert states["rejection-sampling"] == "Completed"
    assert states["reward-helpfulness"] == states["reward-safety"] == "Completed"
    for kind in ("helpfulness", "safety"):
        assert report["stages"][f"reward-{kind}"]["status"] == "completed"
