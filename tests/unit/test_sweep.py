"""Sweeps' own logic: the Pareto front on hand-made points, grid and space parsing, trial directories and configs,
the refusals, and the summary (table, fronts, timing, plots) built from hand-written reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llama2_align.errors import ConfigError
from llama2_align.pipeline import PipelineConfig, resolve
from llama2_align.sweep import (SweepAborted, SweepConfig, check_sweep, grid_points, pareto_front, parse_grid,
                                parse_space, run_sweep, summarize, table_rows, trial_name, write_sweep)

HV = [("helpfulness_accuracy", "max"), ("violation_rate", "min")]


def test_pareto_front_on_hand_made_points():
    pts = [
        {"helpfulness_accuracy": 0.40, "violation_rate": 0.10},  # 0: front
        {"helpfulness_accuracy": 0.35, "violation_rate": 0.05},  # 1: front (safer, less helpful)
        {"helpfulness_accuracy": 0.30, "violation_rate": 0.10},  # 2: dominated by 0
        {"helpfulness_accuracy": 0.40, "violation_rate": 0.12},  # 3: dominated by 0 (equal on one, worse on other)
        {"helpfulness_accuracy": 0.45, "violation_rate": 0.20},  # 4: front (most helpful)
        {"helpfulness_accuracy": None, "violation_rate": 0.00},  # 5: missing a value: no part
        {"helpfulness_accuracy": 0.35, "violation_rate": 0.05},  # 6: equal to 1: both kept
    ]
    assert pareto_front(pts, HV) == [0, 1, 4, 6]
    assert pareto_front([], HV) == []
    assert pareto_front([{"reward": 1.0, "kl": 5.0}, {"reward": 0.5, "kl": 1.0}, {"reward": 0.4, "kl": 2.0}],
                        [("reward", "max"), ("kl", "min")]) == [0, 1]
    # a single objective: only the best
    assert pareto_front([{"r": 1.0}, {"r": 3.0}, {"r": 2.0}], [("r", "max")]) == [1]


def test_parse_grid_and_space():
    assert parse_grid("ppo.kl_beta=0.01,0.02,0.05") == ("ppo.kl_beta", [0.01, 0.02, 0.05])
    assert parse_grid("ppo.kl_beta=[0.01, 0.1]") == ("ppo.kl_beta", [0.01, 0.1])
    assert parse_grid("ppo.iterations=5") == ("ppo.iterations", [5])
    assert parse_grid("eval.judge=oracle,rm") == ("eval.judge", ["oracle", "rm"])
    assert parse_space("k", "log:0.005:0.1") == ("log", [0.005, 0.1])
    assert parse_space("k", "int:1:4") == ("int", [1, 4])
    assert parse_space("k", "cat:0.7,1.0") == ("cat", [0.7, 1.0])
    for bad in ("log:0:1", "float:2:1", "uniform:0:1", "int:a:b", "float:1"):
        with pytest.raises(ValueError, match="optuna.space 'k'"):
            parse_space("k", bad)


def test_grid_points_and_trial_names():
    pts = grid_points({"ppo.kl_beta": [0.01, 0.1], "eval.temperature": [0.7, 1.0]})
    assert pts == [{"ppo.kl_beta": 0.01, "eval.temperature": 0.7}, {"ppo.kl_beta": 0.01, "eval.temperature": 1.0},
                   {"ppo.kl_beta": 0.1, "eval.temperature": 0.7}, {"ppo.kl_beta": 0.1, "eval.temperature": 1.0}]
    names = [trial_name(i, p) for i, p in enumerate(pts)]
    assert names[0].startswith("t00-kl_beta-0.01-temperature-0.7-") and len(set(names)) == 4
    assert trial_name(0, {"ppo.kl_beta": 0.01}) != trial_name(0, {"ppo.kl_beta": 0.010001})  # never the same dir
    assert trial_name(3, {"ppo.kl_beta": 0.01}) == trial_name(3, {"ppo.kl_beta": 0.01})


def test_trial_config_shares_the_upstream_stages(tmp_path):
    sweep = SweepConfig(name="b", pipeline=PipelineConfig(preset="demo-micro", runs_root=str(tmp_path),
                                                          overrides={"ppo.iterations": 2}, tracking=["tensorboard"]),
                        grid={"ppo.kl_beta": [0.01, 0.05]})
    cfgs = check_sweep(sweep)
    assert [c.overrides for c in cfgs] == [{"ppo.iterations": 2, "ppo.kl_beta": 0.01},
                                           {"ppo.iterations": 2, "ppo.kl_beta": 0.05}]
    r = resolve(cfgs[1])
    assert r.run_dir == str(tmp_path / "b" / "trials" / cfgs[1].run_name)
    assert r.upstream_dir() == str(tmp_path / "b") and r.ppo.kl_beta == 0.05 and r.ppo.iterations == 2
    assert r.tracking.experiment == "llama2-align-sweep-b"


def test_sweep_refusals(tmp_path):
    base = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path))
    with pytest.raises(ValidationError, match="only ppo.\\*, rejection_sampling.\\*, eval.\\* can be swept"):
        SweepConfig(pipeline=base, grid={"sft.learning_rate": [1e-3]})
    with pytest.raises(ValidationError, match="a grid or an optuna study"):
        SweepConfig(pipeline=base)
    with pytest.raises(ValidationError, match="objective 'bogus:max'"):
        SweepConfig(pipeline=base, optuna={"trials": 2, "space": {"ppo.kl_beta": "log:0.01:0.1"},
                                           "objectives": ["bogus:max"]})
    with pytest.raises(ConfigError, match="ppo has no field 'nope'"):
        check_sweep(SweepConfig(pipeline=base, grid={"ppo.nope": [1]}))
    with pytest.raises(ValidationError, match="kl_beta"):
        check_sweep(SweepConfig(pipeline=base, grid={"ppo.kl_beta": [0.01, -1]}))


def _fake_trial(run_dir: Path, h: float, v: float, reward: float, kl: float, failed_stage: str | None = None):
    """What a trial's pipeline leaves behind, written by hand: report.json and PPO's metrics.jsonl."""
    run_dir.mkdir(parents=True)
    ci = {"helpfulness_accuracy": [h - 0.30 - 0.05, h - 0.30 + 0.05], "violation_rate": [v - 0.25 - 0.04,
                                                                                          v - 0.25 + 0.04]}
    report = {"baseline": "sft", "final": "ppo",
              "stages": {"sft": {"status": "completed", "duration_s": 100.0},
                         "reward-helpfulness": {"status": "completed", "duration_s": 30.0},
                         "ppo": {"status": "completed", "duration_s": 20.0},
                         "eval": {"status": "completed", "duration_s": 5.0}},
              "eval": {"sft": {"helpfulness_accuracy": 0.30, "violation_rate": 0.25, "rm_helpfulness": 0.1},
                       "ppo": {"helpfulness_accuracy": h, "violation_rate": v, "rm_helpfulness": 0.2, "ci": ci}}}
    if failed_stage:
        report = {"stages": {failed_stage: {"status": "failed", "error": "boom"}}, "eval": {}}
    (run_dir / "report.json").write_text(json.dumps(report))
    (run_dir / "ppo").mkdir()
    rows = [{"iteration": i, "reward_combined": reward + 0.1 * (i - 5), "kl_ref": kl} for i in range(1, 6)]
    (run_dir / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_run_sweep_and_summary_from_hand_made_trials(tmp_path):
    """run_sweep with a stand-in trial function (the flow's runs a pipeline), then sweep.json/md and the plots."""
    from llama2_align.stages.common import StageResult, write_result

    sweep = SweepConfig(name="s", pipeline=PipelineConfig(preset="demo-micro", runs_root=str(tmp_path)),
                        grid={"ppo.kl_beta": [0.01, 0.02, 0.05]})
    values = {0.01: (0.40, 0.20, 0.70, 8.0), 0.02: (0.38, 0.10, 0.65, 4.0), 0.05: (0.30, 0.15, 0.60, 2.0)}
    for stage, secs in (("sft", 100.0), ("reward-helpfulness", 30.0)):  # the shared stages, computed once
        write_result(StageResult(stage=stage, out_dir=str(tmp_path / "s" / stage), duration_s=secs))

    def run_trial(cfg):
        beta = cfg.overrides["ppo.kl_beta"]
        _fake_trial(Path(cfg.runs_root) / cfg.run_name, *values[beta])
        return {"status": "completed" if beta != 0.05 else "failed", "flow_run_id": "x"}

    records = run_sweep(sweep, run_trial, log=lambda m: None)
    assert [r["params"] for r in records] == [{"ppo.kl_beta": b} for b in values]
    summary = summarize(sweep, records, wall_s=200.0)
    names = [t["name"] for t in summary["trials"]]
    assert summary["judge"] == "oracle" and summary["parameters"] == ["ppo.kl_beta"]
    # 0.05 failed: it takes no part in a front; 0.01 and 0.02 trade helpfulness for safety
    assert summary["pareto"]["helpfulness_vs_violation"]["front"] == names[:2]
    t0 = summary["trials"][0]
    m = t0["metrics"]["helpfulness_accuracy"]
    assert (m["value"], m["change"], m["verdict"]) == (0.40, 0.10, "better")
    assert m["ci"] == pytest.approx([0.05, 0.15])
    assert t0["reward"] == pytest.approx(0.60) and t0["kl"] == 8.0  # means of the last 3 iterations (0.5, 0.6, 0.7)
    assert summary["pareto"]["reward_vs_kl"]["front"] == names[:2]
    timing = summary["timing"]
    assert timing["shared_s"] == 130.0 and timing["trial_s"][names[0]] == 25.0
    assert timing["independent_estimate_s"] == 200.0 + 2 * 130.0
    assert timing["saved_fraction"] == pytest.approx(260.0 / 460.0, abs=1e-4)

    paths = write_sweep(summary)
    on_disk = json.loads(Path(paths["sweep_json"]).read_text())
    assert on_disk["plots"] == {"helpfulness_vs_violation": "pareto-helpfulness-vs-violation.png",
                                "reward_vs_kl": "pareto-reward-vs-kl.png"}
    for name in on_disk["plots"].values():
        assert (tmp_path / "s" / name).read_bytes()[:4] == b"\x89PNG"
    md = Path(paths["sweep_md"]).read_text()
    assert "| trial | ppo.kl_beta | helpfulness_accuracy |" in md
    assert "0.400 (+0.100 [+0.050, +0.150])" in md and "![reward_vs_kl](pareto-reward-vs-kl.png)" in md
    assert "## Failed trials" in md
    rows = table_rows(summary)
    assert rows[0]["pareto"] == "helpfulness_vs_violation reward_vs_kl" and rows[2]["status"] == "failed"


def test_a_failed_shared_stage_stops_the_sweep(tmp_path):
    sweep = SweepConfig(name="s", pipeline=PipelineConfig(preset="demo-micro", runs_root=str(tmp_path)),
                        grid={"ppo.kl_beta": [0.01, 0.02]})
    calls = []

    def run_trial(cfg):
        calls.append(cfg.run_name)
        _fake_trial(Path(cfg.runs_root) / cfg.run_name, 0, 0, 0, 0, failed_stage="sft")
        return {"status": "failed", "error": "stage 'sft' failed"}

    with pytest.raises(SweepAborted, match="shared stage 'sft' failed"):
        run_sweep(sweep, run_trial, log=lambda m: None)
    assert len(calls) == 1


def test_optuna_study_asks_and_tells(tmp_path):
    """A 4-trial study: points drawn inside the space, seeded (the same points again), objectives read back."""
    pytest.importorskip("optuna")
    sweep = SweepConfig(name="o", pipeline=PipelineConfig(preset="demo-micro", runs_root=str(tmp_path)),
                        optuna={"trials": 4, "space": {"ppo.kl_beta": "log:0.005:0.2", "ppo.ppo_epochs": "int:1:3"},
                                "seed": 1})

    def run_trial(cfg):
        beta = cfg.overrides["ppo.kl_beta"]
        _fake_trial(Path(cfg.runs_root) / cfg.run_name, 0.5 - beta, beta, 0.7, 1.0 / beta)
        return {"status": "completed"}

    first = run_sweep(sweep, run_trial, log=lambda m: None)
    assert len(first) == 4 and [r["index"] for r in first] == [0, 1, 2, 3]
    for r in first:
        assert 0.005 <= r["params"]["ppo.kl_beta"] <= 0.2 and r["params"]["ppo.ppo_epochs"] in (1, 2, 3)
    again = run_sweep(sweep.model_copy(update={"name": "o2"}), run_trial, log=lambda m: None)
    assert [r["params"] for r in again] == [r["params"] for r in first]
