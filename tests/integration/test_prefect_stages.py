"""The stage tasks under a real (temporary) Prefect server: SFT and reward flows on the micro preset, artifacts
read back through the client, cross-run caching, and a re-run when the stage's output has been deleted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from llama2_align.pipeline import preset_config
from llama2_align.stages.reward import RewardConfig
from llama2_align.stages.sft import SFTConfig
from tests.integration.helpers import task_runs

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


def _sft_config() -> SFTConfig:
    return SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": 12, "batch_size": 8,
                                     "micro_batch_size": 8, "logging_steps": 4, "eval_steps": 6, "save_steps": 6,
                                     "num_samples": 3, "sample_max_new_tokens": 8})


def _rm_config(kind: str) -> RewardConfig:
    return RewardConfig.model_validate({**preset_config("demo-tiny").reward_helpfulness.model_dump(), "kind": kind,
                                           "max_steps": 4,
                                        "batch_size": 8, "micro_batch_size": 8, "logging_steps": 2, "eval_steps": 4,
                                        "save_steps": 4, "min_warmup_steps": 1})


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in arts if a.key}


@pytest.fixture(scope="module")
def demo(prefect_server, tmp_path_factory):
    from flows.demo_prep import demo_prep

    return demo_prep(out_dir=str(tmp_path_factory.mktemp("demo")), seed=0, sizes="micro", vocab_size=1024)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


def _run_sft(demo, run_dir):
    from flows.sft import sft

    state = sft(data=demo["sft"], out_dir=str(run_dir / "sft"), base="micro", tokenizer=demo["tokenizer"],
                config=_sft_config(), return_state=True)
    assert state.is_completed(), state.message
    (task_run,) = task_runs(state.state_details.flow_run_id, ("sft",))
    return state, task_run


def test_sft_flow_publishes_artifacts_and_caches(demo, run_dir):
    state, task_run = _run_sft(demo, run_dir)
    result = state.result()
    assert task_run.name == "sft" and task_run.state.name == "Completed"
    assert Path(result["final"], "config.json").exists() and result["steps"] == 12
    assert Path(run_dir, "sft", "result.json").exists()

    arts = _artifacts(state.state_details.flow_run_id)
    assert {"sft-summary", "sft-metrics", "sft-curves", "sft-samples", "sft-progress"} <= set(arts)
    assert result["final"] in arts["sft-summary"].data and "## Config" in arts["sft-summary"].data
    assert "data:image/png;base64,iVBORw0K" in arts["sft-curves"].data
    assert "train_loss_last" in arts["sft-metrics"].data
    assert '"response"' in arts["sft-samples"].data
    assert arts["sft-progress"].data == 100.0

    # Same inputs, new flow run: served from the cache, the same paths come back.
    again, task_run = _run_sft(demo, run_dir)
    assert task_run.state.name == "Cached"
    assert again.result()["final"] == result["final"]
    assert "sft-summary" not in _artifacts(again.state_details.flow_run_id)  # the body did not run


def test_sft_runs_again_when_its_output_is_gone(demo, run_dir):
    _run_sft(demo, run_dir)  # ensure the first run happened (cached when the test above ran)
    shutil.rmtree(run_dir / "sft")
    state, task_run = _run_sft(demo, run_dir)
    assert task_run.state.name == "Completed"  # not "Cached": the cached paths no longer exist
    assert Path(state.result()["final"], "config.json").exists()
    assert Path(run_dir, "sft", "result.json").exists()
    _, task_run = _run_sft(demo, run_dir)
    assert task_run.state.name == "Cached"


def test_reward_flow_trains_both_models_and_publishes_accuracy_tables(demo, run_dir):
    from flows.reward import reward

    sft_state, _ = _run_sft(demo, run_dir)
    state = reward(sft_model=sft_state.result()["final"], data=demo["preference"], run_dir=str(run_dir),
                   helpfulness=_rm_config("helpfulness"), safety=_rm_config("safety"), return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert set(results) == {"helpfulness", "safety"}
    assert "unsafe_recall" in results["safety"]["metrics"]
    runs = task_runs(state.state_details.flow_run_id, ("reward-helpfulness", "reward-safety"))
    assert {t.name: t.state.name for t in runs} == {"reward-helpfulness": "Completed",
                                                         "reward-safety": "Completed"}
    # Submitted together to a process pool: each trained in its own worker process (so they can overlap; on the
    # micro preset they are too quick for a wall-clock overlap check to be reliable).
    pids = {results[k]["provenance"]["pid"] for k in results}
    assert len(pids) == 2 and os.getpid() not in pids

    arts = _artifacts(state.state_details.flow_run_id)
    for kind in ("helpfulness", "safety"):
        assert {f"reward-{kind}-{a}" for a in ("summary", "metrics", "accuracy", "curves")} <= set(arts)
        table = arts[f"reward-{kind}-accuracy"].data
        assert "significantly better" in table and "negligibly better" in table and "safety" in table
        assert "data:image/png;base64," in arts[f"reward-{kind}-curves"].data


def test_validation_error_fails_at_once_with_its_message(demo, tmp_path):
    from flows.sft import sft

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nonsense": 1}\n')
    state = sft(data=str(bad), out_dir=str(tmp_path / "sft"), base="micro", tokenizer=demo["tokenizer"],
                config=_sft_config(), return_state=True)
    assert state.is_failed()
    (task_run,) = task_runs(state.state_details.flow_run_id, ("sft",))
    assert task_run.state.name == "Failed" and task_run.run_count == 1  # never retried
    assert "DataValidationError" in task_run.state.message and "bad.jsonl" in task_run.state.message
    assert not (tmp_path / "sft" / "result.json").exists()
