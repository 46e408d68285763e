"""The seed sweep's library side: one config per seed, and the summary across seeds from hand-made reports."""

from __future__ import annotations

import json

import pytest

from llama2_align.errors import ConfigError
from llama2_align.pipeline import PipelineConfig
from llama2_align.seeds import render_markdown, seed_configs, summarize_seeds, table_rows


def test_one_config_per_seed(tmp_path):
    cfg = PipelineConfig(preset="demo-micro", run_name="demo", runs_root=str(tmp_path), overrides={"ppo.iterations": 2})
    configs = seed_configs(cfg, [0, 3])
    assert [c.run_name for c in configs.values()] == ["demo-s0", "demo-s3"]
    assert configs[3].overrides == {"ppo.iterations": 2, "data.demo_seed": 3}
    for bad in ([], [1, 1]):
        with pytest.raises(ConfigError):
            seed_configs(cfg, bad)
    with pytest.raises(ConfigError, match="data.demo_seed"):
        seed_configs(cfg.model_copy(update={"overrides": {"data.demo_seed": 2}}), [0])


def _report(path, help_base, help_final, viol_ci, passed):
    ev = {"sft": {"helpfulness_accuracy": help_base, "violation_rate": 0.3, "false_refusal_rate": 0.1,
                  "malformed_rate": 0.05},
          "ppo": {"helpfulness_accuracy": help_final, "violation_rate": 0.1, "false_refusal_rate": 0.11,
                  "malformed_rate": 0.04,
                  "ci": {"helpfulness_accuracy": [help_final - help_base - 0.03, help_final - help_base + 0.03],
                         "violation_rate": viol_ci}}}
    path.write_text(json.dumps({"baseline": "sft", "final": "ppo", "eval": ev, "demo_bar": {"passed": passed},
                                "stages": {"sft": {"duration_s": 10.0}},
                                "eval_rules": {"refusal": "demo-world oracle"}}))
    return str(path)


def test_summary_across_seeds(tmp_path):
    cfg = PipelineConfig(run_name="demo", runs_root=str(tmp_path))
    runs = {0: {"status": "completed", "run_dir": "r0", "wall_s": 100.0,
                "report_json": _report(tmp_path / "a.json", 0.40, 0.50, [-0.3, -0.1], True)},
            1: {"status": "completed", "run_dir": "r1", "wall_s": 110.0,
                "report_json": _report(tmp_path / "b.json", 0.40, 0.44, [-0.25, 0.01], False)},
            2: {"status": "failed", "run_dir": "r2", "error": "stage 'ppo' failed"}}
    s = summarize_seeds(cfg, runs)
    assert s["seeds"] == [0, 1, 2] and s["bar_passed"] == {"0": True, "1": False, "2": None}
    assert not s["bar_passed_all"]
    h = s["across_seeds"]["helpfulness_accuracy"]
    assert h["mean"] == pytest.approx(0.07) and h["min"] == pytest.approx(0.04) and h["max"] == pytest.approx(0.10)
    assert s["across_seeds"]["violation_rate"]["seeds_significantly_better"] == 1  # seed 1's interval holds 0
    rows = table_rows(s)
    assert [r["bar"] for r in rows] == ["PASSED", "NOT MET", "run failed"]
    assert "0.400 → 0.500 (+0.100 [+0.070, +0.130])" in rows[0]["helpfulness_accuracy"]
    md = render_markdown(s)
    assert "NOT MET" in md and "seed 2: stage 'ppo' failed" in md
