"""Runs that fail, get killed or are refused, through real processes: `llama2-align run` as a subprocess, torchrun
with its ranks, the rlhf-pipeline flow against a Prefect server.

- a stage that fails at run time prints one paragraph (the stage, the error, the log file, how to resume), no
  traceback on the console, the traceback in the log file;
- `llama2-align run` killed with SIGKILL mid-run leaves no process behind (the local API server), and the same
  command resumes: finished stages come from the cache, PPO from its newest checkpoint;
- a process running a stage under torchrun killed with SIGKILL takes torchrun and its ranks with it;
- the flow refuses a bad run before any task runs, with the message as the flow run's state message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tests.integration.helpers import _env, _servers_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# demo-micro with every stage cut to a few steps: the failure and kill tests need the stages to run, not to learn
QUICK = ["--preset", "demo-micro", "--set", "sft.max_steps=4", "--set", "sft.eval_steps=2", "--set", "sft.save_steps=2",
         "--set", "reward_helpfulness.max_steps=2", "--set", "reward_safety.max_steps=2"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _wait_until(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"not {what} after {timeout_s}s"
        time.sleep(0.2)


def test_a_failing_stage_reads_like_an_error(home, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", *QUICK, "--set", "ppo.learning_rate=1e30",
                           "--runs-root", str(tmp_path)], env=_env(home), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    console = proc.stdout + proc.stderr
    assert "Traceback" not in console, console[-4000:]
    assert "error: stage 'ppo' failed: PPO iteration" in proc.stderr and "NaN or inf" in proc.stderr
    assert "run the same command again" in proc.stderr and "'ppo' resumes from its newest checkpoint" in proc.stderr
    log = next((tmp_path / "demo" / "logs").glob("run-*.log"))
    assert str(log.relative_to(tmp_path.parent)) in proc.stderr or str(log) in proc.stderr
    assert "Traceback" in log.read_text() and "NonFiniteError" in log.read_text()
    assert _servers_of(home) == []


def test_sigkill_leaves_no_process_behind_and_the_same_command_resumes(home, tmp_path):
    argv = [sys.executable, "-m", "flows.cli", "run", *QUICK, "--set", "ppo.iterations=8", "--set",
            "ppo.save_every=2", "--runs-root", str(tmp_path)]
    out = open(tmp_path / "first.out", "w")
    proc = subprocess.Popen(argv, env=_env(home), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    ppo = tmp_path / "demo" / "ppo"
    try:
        _wait_until(lambda: (ppo / "checkpoint-2").is_dir(), 600, "a PPO checkpoint", proc)
        assert _servers_of(home), "the run's local API server should be up"
        proc.send_signal(signal.SIGKILL)  # what an out-of-memory killer does
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_until(lambda: _servers_of(home) == [], 15, "the orphaned API server gone")

    sft_result = tmp_path / "demo" / "sft" / "result.json"
    sft_written = sft_result.stat().st_mtime_ns
    rerun = subprocess.run(argv, env=_env(home), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    result = json.loads((ppo / "result.json").read_text())
    assert result["steps"] == result["planned_steps"] == 8
    assert Path(result["provenance"]["resumed_from"]).name.startswith("checkpoint-")
    assert sft_result.stat().st_mtime_ns == sft_written  # SFT was not trained again
    assert _servers_of(home) == []

    # the same run name with another PPO setting: refused before any stage runs, the finished PPO left as it was
    ppo_written = (ppo / "result.json").stat().st_mtime_ns
    other = subprocess.run(argv + ["--set", "ppo.kl_beta=0.3"], env=_env(home), capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert other.returncode == 1, (other.stdout + other.stderr)[-4000:]
    assert "holds a finished ppo stage run with other settings (ppo.kl_beta)" in other.stderr, other.stderr
    assert "Traceback" not in other.stdout + other.stderr and "resumes from its newest checkpoint" not in other.stderr
    assert (ppo / "result.json").stat().st_mtime_ns == ppo_written
    assert _servers_of(home) == []


LAUNCH_SCRIPT = textwrap.dedent("""
    import sys
    from llama2_align.launch import launch_stage
    from llama2_align.pipeline import preset_config
    from llama2_align.stages.sft import SFTConfig, SFTInputs
    cfg = SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": 10000,
                                    "batch_size": 8, "micro_batch_size": 4, "logging_steps": 1, "save_steps": 10000,
                                    "eval_steps": 10000, "num_samples": 0, "progress_bar": False,
                                    "num_processes": 2})
    launch_stage("sft", cfg, SFTInputs(base="micro", data=sys.argv[1], tokenizer=sys.argv[2]), sys.argv[3], 2,
                 log=lambda line: print(line, flush=True))
""")


def test_a_killed_task_takes_torchrun_and_its_ranks_with_it(tmp_path, demo_world_dir, tokenizer_dir):
    out = tmp_path / "sft"
    parent = subprocess.Popen([sys.executable, "-c", LAUNCH_SCRIPT, str(demo_world_dir / "sft.jsonl"),
                               str(tokenizer_dir), str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    spec = str(out / ".launch" / "spec.json")
    try:
        _wait_until(lambda: (out / "metrics.jsonl").exists(), 300, "both ranks training", parent)
        ranks = _processes_with(spec)
        assert len(ranks) >= 3, ranks  # torchrun and its two ranks
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_until(lambda: not _processes_with(spec), 30, "torchrun and the ranks gone")
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in _processes_with(spec):
            os.kill(pid, signal.SIGKILL)


def test_the_flow_refuses_a_bad_run_before_any_task(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import rlhf_pipeline
    from llama2_align.pipeline import PipelineConfig

    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path / "runs"), base_model=str(tmp_path / "nope"))
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    assert "refused before any stage ran" in state.message and "base_model" in state.message, state.message
    assert not (tmp_path / "runs").exists()

    import asyncio

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    assert asyncio.run(task_runs()) == []
