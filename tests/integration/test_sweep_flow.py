"""A 2-point β sweep on demo-micro through the rlhf-sweep flow: sweep.json / sweep.md layout, the plots, the
rlhf-sweep artifact, and the shared stages computed once (the second trial's SFT and reward-model tasks are served
from the cache, and no trial directory holds a copy of them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.integration.helpers import latest_artifact, task_states

pytestmark = pytest.mark.slow

SHARED = ("sft", "reward-helpfulness", "reward-safety")


def test_beta_sweep_micro_shares_sft_and_reward_models(prefect_server, tmp_path):
    import torch

    from flows.sweep import rlhf_sweep
    from llama2_align.pipeline import PipelineConfig
    from llama2_align.sweep import SweepConfig

    torch.set_num_threads(1)
    sweep = SweepConfig(name="beta", pipeline=PipelineConfig(preset="demo-micro", runs_root=str(tmp_path)),
                        grid={"ppo.kl_beta": [0.01, 0.2]})
    state = rlhf_sweep(sweep=sweep, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    root = tmp_path / "beta"
    summary = json.loads((root / "sweep.json").read_text())
    assert out["sweep_json"] == str(root / "sweep.json")

    # layout
    assert set(summary) >= {"name", "sweep_dir", "preset", "method", "parameters", "judge", "baseline", "trials",
                            "pareto", "timing", "plots"}
    assert summary["method"] == "grid" and summary["parameters"] == ["ppo.kl_beta"] and summary["judge"] == "oracle"
    trials = summary["trials"]
    assert [t["params"] for t in trials] == [{"ppo.kl_beta": 0.01}, {"ppo.kl_beta": 0.2}]
    for t in trials:
        assert t["status"] == "completed"
        assert set(t["metrics"]["violation_rate"]) == {"value", "change", "ci", "verdict"}
        assert len(t["metrics"]["helpfulness_accuracy"]["ci"]) == 2
        assert isinstance(t["reward"], float) and isinstance(t["kl"], float)
        trial_dir = Path(t["run_dir"])
        assert trial_dir.parent == root / "trials" and (trial_dir / "report.json").exists()
        assert {p.name for p in trial_dir.iterdir() if p.is_dir()} == {"ppo", "eval"}  # no copy of the shared ones
        report = json.loads((trial_dir / "report.json").read_text())
        assert report["stages"]["sft"]["output"] == str(root / "sft" / "final")
    for key in ("helpfulness_vs_violation", "reward_vs_kl"):
        front = summary["pareto"][key]["front"]
        assert front and set(front) <= {t["name"] for t in trials}
        assert (root / summary["plots"][key]).read_bytes()[:4] == b"\x89PNG"
    md = (root / "sweep.md").read_text()
    assert md.startswith("# Sweep `beta` (grid, 2 trials, preset demo-micro)")
    assert all(t["name"] in md for t in trials) and "## Pareto fronts" in md and "## Time" in md
    assert "data:image/png;base64," in latest_artifact("rlhf-sweep")

    # the shared stages ran once: in the first trial; the second one's tasks were served from the cache
    first, second = (task_states(t["flow_run_id"], (*SHARED, "ppo", "eval")) for t in trials)
    assert all(first[s] == "Completed" for s in SHARED), first
    assert all(second[s] == "Cached" for s in SHARED), second
    assert second["ppo"] == "Completed" and second["eval"] == "Completed"
    for s in SHARED:
        assert (root / s / "result.json").exists()
    timing = summary["timing"]
    assert set(timing["shared_stages_s"]) == set(SHARED) and timing["trials"] == 2
    assert 0 < timing["saved_fraction"] < 1 and timing["saved_s"] == pytest.approx(timing["shared_s"], abs=0.02)
