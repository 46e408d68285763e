"""Iterative rounds through the command line and a real Prefect server: a 2-round micro run end to end (simulated
annotator), and a round that waits for human labels, refuses a bad labelled file while it stays paused, and goes on
once a good one is given (by the command line and through the API, as the UI's Resume form does)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Round 0 and each round as small as the stages allow: the test is about the loop, not about learning.
MICRO = ["--preset", "demo-micro", "--set", "sft.max_steps=12", "--set", "reward_helpfulness.max_steps=4",
         "--set", "reward_safety.max_steps=4", "--set", "eval.max_prompts=15", "--set", "ppo.iterations=1",
         "--prompts-per-round", "12"]


def _env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HF_HUB_OFFLINE": "1",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "rounds", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_two_micro_rounds_through_the_cli(prefect_server, tmp_path):
    args = [*MICRO, "--rounds", "2", "--methods", "rs,ppo", "--run-name", "micro", "--runs-root", str(tmp_path)]
    proc = _cli(*args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rounds_dir = tmp_path / "micro" / "rounds"
    report = json.loads((rounds_dir / "report.json").read_text())
    assert [r["method"] for r in report["rounds"]] == ["rs", "ppo"] and report["judge"] == "oracle"
    for r in report["rounds"]:
        assert set(r["staleness"]) == {"helpfulness", "safety"}
        for st in r["staleness"].values():  # the retrained RM against the previous one on the same pairs, with a CI
            assert not st["pairs"] or (st["change"]["ci"][0] <= st["change"]["change"] <= st["change"]["ci"][1])
        assert r["vs_sft"]["violation_rate"]["ci"] is not None and r["gate"]["checks"]
        assert r["promoted"] == r["gate"]["promoted"]
    for kind, pooled in report["staleness_pooled"].items():  # every round's test pairs together
        assert pooled["rounds"] == [1, 2] and pooled["pairs"] == sum(r["staleness"][kind]["pairs"]
                                                                     for r in report["rounds"])
    second = json.loads((rounds_dir / "2" / "round.json").read_text())
    first = json.loads((rounds_dir / "1" / "round.json").read_text())
    assert second["started_from"] == (first["candidate"] if first["promoted"] else first["started_from"])
    assert second["eval"]["baseline"] == ("previous" if first["promoted"] else "sft")
    assert (rounds_dir / "2" / "ppo" / "result.json").exists()
    assert not (rounds_dir / "2" / "rejection-sampling").exists()
    # the round's reward models were warm-started from the previous round's, on all pairs so far
    rm = json.loads((rounds_dir / "2" / "reward-safety" / "result.json").read_text())
    assert rm["inputs"]["init"]["path"] == str((rounds_dir / "1" / "reward-safety" / "final").resolve())
    prefs = (rounds_dir / "2" / "preferences.jsonl").read_text().count("\n")
    assert prefs == (rounds_dir / "1" / "preferences.jsonl").read_text().count("\n") + \
        (rounds_dir / "2" / "train_pairs.jsonl").read_text().count("\n")
    # the demo rounds' warm starts run at a lower learning rate than the RMs' first training (rounds._DEMO_ROUNDS)
    assert rm["config"]["learning_rate"] == 1e-4
    assert json.loads((rounds_dir / "2" / "reward-helpfulness" / "result.json").read_text()
                      )["config"]["learning_rate"] == 2.5e-4
    # bench/rm_warm_start.py retrains the rounds' RMs offline: at the rounds' own learning rate it reproduces the
    # staleness table's change from the previous RM to the retrained one
    bench = subprocess.run([sys.executable, "bench/rm_warm_start.py", str(tmp_path / "micro"), "--kind", "helpfulness",
                            "--lr", "2.5e-4", "--out", str(tmp_path / "warm")], env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, (bench.stdout + bench.stderr)[-4000:]
    for r in report["rounds"]:
        st = r["staleness"]["helpfulness"]
        if st["pairs"]:
            assert f"{st['change']['change']:+.3f} [{st['change']['ci'][0]:+.3f}," in bench.stdout, bench.stdout
    assert (rounds_dir / "figure11.png").read_bytes()[:4] == b"\x89PNG"
    assert "violation vs SFT" in proc.stdout and "retrained RM, new pairs" in proc.stdout
    state = json.loads((rounds_dir / "state.json").read_text())
    assert state["status"] == "finished" and [r["round"] for r in state["rounds"]] == [1, 2]

    # a round stopped before its end goes on at the stage that did not finish: round 2 lost its evaluation
    ppo_written = (rounds_dir / "2" / "ppo" / "result.json").stat().st_mtime_ns
    (rounds_dir / "2" / "round.json").unlink()
    shutil.rmtree(rounds_dir / "2" / "eval")
    again = _cli(*args)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "round 1: done before" in again.stdout and "round 2: done before" not in again.stdout
    assert (rounds_dir / "2" / "ppo" / "result.json").stat().st_mtime_ns == ppo_written
    assert json.loads((rounds_dir / "2" / "round.json").read_text())["candidate"] == second["candidate"]
    other = _cli(*args, "--samples-per-prompt", "4")
    assert other.returncode == 2 and "samples_per_prompt" in other.stderr


def test_collect_pairs_answers_of_two_checkpoints(tmp_path, sft_dir, demo_world_dir):
    import torch

    from llama2_align.data import validate_records
    from llama2_align.rounds import to_label_records
    from llama2_align.stages.collect import CollectConfig, CollectInputs, run_collect

    torch.set_num_threads(1)
    cfg = CollectConfig(samples_per_prompt=4, temperatures=(0.7, 1.3), max_prompts=12, max_new_tokens=12)
    final = str(sft_dir / "final")
    result = run_collect(cfg, CollectInputs(policy=final, policy_b=final, prompts=str(demo_world_dir /
                                                                                       "ppo_prompts.jsonl")),
                         tmp_path / "collect")
    m = result.metrics
    assert m["policy_b"] and m["prompts"] == 12 and m["pairs"] + m["dropped_identical"] + m["dropped_empty"] == 24
    from llama2_align.io import read_jsonl

    pairs = read_jsonl(tmp_path / "collect" / "pairs.jsonl")
    assert len({p["id"] for p in pairs}) == len(pairs) == m["pairs"] > 0
    assert all({p["variant_a"], p["variant_b"]} == {"a", "b"} and p["response_a"] != p["response_b"] for p in pairs)
    rows = to_label_records(pairs)
    for row in rows:
        row["rating"] = "better"
    validate_records(rows, "preference")


def _flow_run_state(flow_run_id: str) -> str:
    from prefect import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_flow_run(UUID(flow_run_id))).state.type.value

    return asyncio.run(read())


def _wait(check, what: str, proc: subprocess.Popen, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the rounds run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def _paused(rounds_dir: Path, attempt: int):
    path = rounds_dir / "state.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    paused = state.get("paused") or {}
    return paused if paused.get("attempt") == attempt and _flow_run_state(paused["flow_run_id"]) == "PAUSED" \
        else None


def test_a_round_waits_for_labels_refuses_a_bad_file_and_resumes(prefect_server, tmp_path):
    """Round 0 trains the micro SFT and reward models (a few steps); round 1 collects, writes to_label.jsonl and
    pauses. (Copying finished stage directories trained with other settings in as round 0 is refused: their results
    would not be this run's.)"""
    from prefect.flow_runs import resume_flow_run

    from llama2_align import demo_annotator
    from llama2_align.data import write_jsonl
    from llama2_align.io import read_jsonl

    run_dir = tmp_path / "human"
    config = tmp_path / "rounds.json"
    config.write_text(json.dumps({"annotation_poll_s": 1, "annotator": "human", "rounds": 1, "methods": ["rs"]}))
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "rounds", *MICRO, "--config", str(config),
                             "--run-name", "human", "--runs-root", str(tmp_path)], env=_env(), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rounds_dir = run_dir / "rounds"
    try:
        paused = _wait(lambda: _paused(rounds_dir, 1), "the pause for labels", proc)
        to_label = read_jsonl(paused["to_label"])
        assert to_label and all(r["rating"] == "" for r in to_label)

        # a bad file: refused by the command line, and the run stays paused
        bad = tmp_path / "bad.jsonl"
        shutil.copy(paused["to_label"], bad)
        refused = _cli("resume", "human", "--labels", str(bad), "--runs-root", str(tmp_path), timeout=120)
        assert refused.returncode == 1 and "rating" in refused.stderr and "still waits" in refused.stderr
        assert _flow_run_state(paused["flow_run_id"]) == "PAUSED" and not (rounds_dir / "1" / "labels.jsonl").exists()
        # ... and by the flow itself when it comes through the API (the UI's Resume form): it waits again
        resume_flow_run(UUID(paused["flow_run_id"]), run_input={"labels": str(bad)})
        again = _wait(lambda: _paused(rounds_dir, 2), "the second pause", proc)
        assert "rating" in again["errors"] and again["flow_run_id"] == paused["flow_run_id"]

        # good labels (the demo world's annotator stands in for people): accepted, and the round goes on
        records, _ = demo_annotator.annotate(read_jsonl(rounds_dir / "1" / "collect" / "pairs.jsonl"), seed=5)
        good = write_jsonl(records, tmp_path / "labelled.jsonl")
        resumed = _cli("resume", "human", "--labels", str(good), "--runs-root", str(tmp_path), timeout=120)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resumed flow run" in resumed.stdout
        assert proc.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    record = json.loads((rounds_dir / "1" / "round.json").read_text())
    assert record["annotation"]["annotator"] == "human" and record["annotation"]["pairs"] == len(records)
    state = json.loads((rounds_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["paused"] is None
    assert _flow_run_state(paused["flow_run_id"]) == "COMPLETED"
