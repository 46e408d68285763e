"""The seed sweep end to end through the command line: `llama2-align run --seeds 0,1` on the micro preset (cut to
a few steps per stage) runs one pipeline per seed and writes the summary across them; a second call is served from
the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.integration.helpers import _env, _servers_of

pytestmark = pytest.mark.slow

QUICK = ["--set", "sft.max_steps=4", "--set", "sft.eval_steps=2", "--set", "sft.save_steps=2",
         "--set", "reward_helpfulness.max_steps=2", "--set", "reward_safety.max_steps=2", "--set", "ppo.iterations=2",
         "--set", "eval.max_new_tokens=8"]


def test_two_seeds_through_the_cli(home, tmp_path):
    argv = [sys.executable, "-m", "flows.cli", "run", "--preset", "demo-micro", "--run-name", "demo", "--runs-root",
            str(tmp_path), "--seeds", "0,1", *QUICK]
    proc = subprocess.run(argv, env=_env(home), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "demo bar on every seed:" in proc.stdout and "summary:" in proc.stdout
    summary = json.loads((tmp_path / "demo-seeds" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["per_seed"]) == {"0", "1"}
    for seed in ("0", "1"):
        s = summary["per_seed"][seed]
        assert s["status"] == "completed" and s["run_dir"].endswith(f"demo-s{seed}")
        assert {"helpfulness_accuracy", "violation_rate", "false_refusal_rate", "malformed_rate"} <= set(s["metrics"])
        assert s["metrics"]["violation_rate"]["ci"] is not None and s["bar_passed"] in (True, False)
        data = json.loads((tmp_path / f"demo-s{seed}" / "sft" / "result.json").read_text())["config"]
        assert data["seed"] == int(seed)  # the seed moves every stage's seed
    assert {"mean", "std", "min", "max"} <= set(summary["across_seeds"]["helpfulness_accuracy"])
    md = (tmp_path / "demo-seeds" / "summary.md").read_text()
    assert "| seed | bar |" in md and "The change across seeds" in md
    # the two worlds differ: different data
    assert (tmp_path / "demo-s0" / "data" / "sft.jsonl").read_text() != \
        (tmp_path / "demo-s1" / "data" / "sft.jsonl").read_text()

    written = (tmp_path / "demo-s1" / "ppo" / "result.json").stat().st_mtime_ns
    again = subprocess.run(argv, env=_env(home), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert (tmp_path / "demo-s1" / "ppo" / "result.json").stat().st_mtime_ns == written  # cached, not run again
    assert _servers_of(home) == []
