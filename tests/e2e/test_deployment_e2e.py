"""End to end through a real Prefect server and process worker, the way the UI's "Run" button runs the pipeline.

A `prefect server start` subprocess (own PREFECT_HOME and SQLite database), the `llama2-gpu` process work pool and
the `gpu` tag concurrency limit, `prefect deploy --all --prefect-file deployments/prefect.yaml`, a `prefect worker
start` subprocess; then the `rlhf-pipeline` deployment's form schema is checked, a flow run is created from it with
the demo-micro preset, and its task runs, artifacts and report.json are read back; then `rlhf-eval`
(flows/evaluate.py) runs on the checkpoints it wrote; then `rlhf-rounds` with human annotation on the same run
directory suspends in round 1, the server and the worker are restarted, `llama2-align rounds resume` gives it labels
and the round finishes; then four pipeline runs are submitted at once (load: the `gpu` limit serialises their heavy
stages, and no run touches another's files). Every process started here is stopped by its pid (SIGINT, then
SIGKILL) whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.helpers import finished, wait_for_task_runs

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "llama2-gpu"
STAGE_TASKS = ("sft", "reward-helpfulness", "reward-safety", "ppo", "eval", "report")
RUN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, api_url: str) -> dict[str, str]:
    """An explicit environment for every subprocess: nothing inherited from the test session's Prefect set-up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # Test-only pacing: the worker polls every 2 s (default 10 s) and a task waiting on the `gpu` limit retries
        # after 1-2 s (default 10-30 s); what is checked (pick-up, serialised stages) is the same, with less idling.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
        "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": os.environ.get("HF_HOME", str(tmp / "hf-home")),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
        "LLAMA2_ALIGN_ROOT": str(REPO),
        "LLAMA2_ALIGN_RUNS_ROOT": str(tmp / "runs-default"),
    })
    return env


def _cli(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    # Its own session, so that a Ctrl-C in the terminal running pytest does not reach it before our finally does.
    return subprocess.Popen([PREFECT, *args], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGINT (a background worker may ignore SIGTERM), wait, then SIGKILL; its process group too (its children)."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGINT)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), lambda: os.kill(proc.pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout_s}s:\n{log.read_text()[-4000:]}")


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref") or (node.get("allOf") or [{}])[0].get("$ref")
    if ref:
        return schema["definitions"][ref.split("/")[-1]]
    return node


async def _run_to_end(client, deployment_id, parameters: dict, logs: dict[str, Path], timeout_s: float = RUN_TIMEOUT_S):
    """What the UI's Run button does: a flow run from the deployment, picked up by the worker; wait for its end."""
    run = await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    deadline = time.monotonic() + timeout_s
    while True:
        run = await client.read_flow_run(run.id)
        if run.state and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run still {run.state.name if run.state else None} after "
                                 f"{timeout_s}s; worker log:\n{logs['worker'].read_text()[-6000:]}")
        await asyncio.sleep(2)


async def _exercise(api_url: str, runs_root: Path, logs: dict[str, Path]) -> None:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with PrefectClient(api=api_url) as client:
        # All eight deployments, on the GPU pool, with inactive schedules where they have any.
        deployments = {d.name: d for d in await client.read_deployments()}
        assert {"rlhf-pipeline", "rlhf-seeds", "rlhf-sweep", "rlhf-rounds", "rlhf-eval", "sft", "reward", "ppo"} \
            <= set(deployments), deployments.keys()
        assert deployments["rlhf-sweep"].parameters["sweep"]["grid"] == {"ppo.kl_beta": [0.01, 0.02, 0.05, 0.1]}
        for name, d in deployments.items():
            assert d.work_pool_name == POOL, (name, d.work_pool_name)
            assert "gpu" in d.tags and all(not s.active for s in d.schedules), (name, d.tags, d.schedules)
            assert d.job_variables["env"]["HF_HUB_OFFLINE"] == "1"
            assert d.job_variables["env"]["LLAMA2_ALIGN_ROOT"] == str(REPO)
        assert len(deployments["rlhf-pipeline"].schedules) == 1 and len(deployments["rlhf-eval"].schedules) == 1

        # The form the UI renders: config -> preset (a drop-down incl. demo-tiny), run_name, overrides.
        dep = await client.read_deployment_by_name("rlhf-pipeline/rlhf-pipeline")
        schema = dep.parameter_openapi_schema
        config = _resolve(schema, schema["properties"]["config"])
        fields = config["properties"]
        assert config.get("additionalProperties") is False  # the form refuses unknown fields
        assert {"preset", "run_name", "runs_root", "overrides", "base_model", "data"} <= set(fields), fields.keys()
        preset = _resolve(schema, fields["preset"])
        assert {"demo-tiny", "demo-micro", "llama2-7b-lora"} <= set(preset["enum"]), preset
        assert dep.parameters["config"]["preset"] == "demo-tiny"

        # The UI's Run button with the quickest preset.
        run = await _run_to_end(client, dep.id, {"config": {"preset": "demo-micro", "runs_root": str(runs_root)}},
                                logs)
        print(f"[e2e] rlhf-pipeline run {run.state.name} in {run.total_run_time.total_seconds():.0f}s")
        assert run.state.is_completed(), (f"flow run ended {run.state.name}: {run.state.message}\n"
                                          f"worker log:\n{logs['worker'].read_text()[-6000:]}")

        only_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        task_runs = await wait_for_task_runs(client, [run.id], finished(STAGE_TASKS))
        states = {t.name: t.state.type.value for t in task_runs}
        for name in STAGE_TASKS:
            assert states.get(name) == "COMPLETED", states
        gpu_tagged = {t.name for t in task_runs if "gpu" in t.tags}
        assert {"sft", "reward-helpfulness", "reward-safety", "ppo", "eval"} <= gpu_tagged, gpu_tagged

        artifacts = await client.read_artifacts(flow_run_filter=only_this_run)
        keys = {a.key for a in artifacts if a.key}
        assert {"rlhf-report", "rlhf-headline", "sft-summary"} <= keys, sorted(keys)

        report = runs_root / "demo" / "report.json"
        assert report.is_file(), list(runs_root.rglob("*"))[:50]
        data = json.loads(report.read_text())
        assert {"stages", "eval"} <= set(data), list(data)

        # Evaluation alone (flows/evaluate.py) through its deployment, on the checkpoints the pipeline just wrote.
        run_dir = runs_root / "demo"
        ev = await client.read_deployment_by_name("evaluate/rlhf-eval")
        params = {"checkpoints": {"sft": str(run_dir / "sft" / "final"), "ppo": str(run_dir / "ppo" / "final")},
                  "baseline": "sft", "prompts": str(run_dir / "data" / "eval.jsonl"),
                  "reward_helpfulness": str(run_dir / "reward-helpfulness" / "final"),
                  "reward_safety": str(run_dir / "reward-safety" / "final"), "out_dir": str(run_dir / "eval-alone")}
        run = await _run_to_end(client, ev.id, params, logs)
        assert run.state.is_completed(), f"rlhf-eval ended {run.state.name}: {run.state.message}"
        assert (run_dir / "eval-alone" / "result.json").is_file()

        await _load(client, dep, runs_root / "load", logs)


LOAD_RUNS = 4


async def _load(client, dep, runs_root: Path, logs: dict[str, Path]) -> None:
    """Four pipeline runs submitted at once (the worker takes them all) with the `gpu` limit at 1: all finish, no
    two GPU-tagged stages overlap in time, and no run touches another's files (each run's files were all written
    while that run was running, inside its own run directory)."""
    t0 = time.monotonic()
    quick = {"sft.max_steps": 4, "sft.eval_steps": 2, "sft.save_steps": 2, "reward_helpfulness.max_steps": 2,
             "reward_safety.max_steps": 2, "ppo.iterations": 2, "eval.max_new_tokens": 8}  # concurrency, not learning
    params = [{"config": {"preset": "demo-micro", "runs_root": str(runs_root), "run_name": f"load-{i}",
                          "overrides": quick}} for i in range(LOAD_RUNS)]
    runs = await asyncio.gather(*(_run_to_end(client, dep.id, p, logs, timeout_s=1200) for p in params))
    print(f"[e2e] {LOAD_RUNS} concurrent runs done after {time.monotonic() - t0:.0f}s")
    for run in runs:
        assert run.state.is_completed(), (f"{run.name} ended {run.state.name}: {run.state.message}\n"
                                          f"worker log:\n{logs['worker'].read_text()[-6000:]}")
    def all_gpu_stages_finished(found) -> bool:  # each run's five GPU-tagged stages
        return sum("gpu" in t.tags and t.state is not None and t.state.is_final() for t in found) >= LOAD_RUNS * 5

    task_runs = await wait_for_task_runs(client, [r.id for r in runs], all_gpu_stages_finished)
    gpu = sorted(((t.start_time, t.end_time, t.name, t.flow_run_id) for t in task_runs if "gpu" in t.tags),
                 key=lambda x: x[0])
    assert len(gpu) == LOAD_RUNS * 5, [(n, str(f)) for _, _, n, f in gpu]
    for (_, end, name, _), (start, _, nxt, _) in zip(gpu, gpu[1:]):
        assert start >= end, f"GPU-tagged stages overlap: {name} ended {end}, {nxt} started {start}"
    assert sorted(p.name for p in runs_root.iterdir()) == [f"load-{i}" for i in range(LOAD_RUNS)]
    for run, p in zip(runs, params):
        run_dir = runs_root / p["config"]["run_name"]
        start, end = run.start_time.timestamp() - 1, run.end_time.timestamp() + 1
        for f in (f for f in run_dir.rglob("*") if f.is_file()):
            assert start <= f.stat().st_mtime <= end, f"{f} was written outside its run's time"
        report = json.loads((run_dir / "report.json").read_text())
        for name, stage in report["stages"].items():
            assert Path(stage["output"]).resolve().is_relative_to(run_dir.resolve()), (name, stage["output"])


ROUNDS_CONFIG = {"preset": "demo-micro", "run_name": "demo", "annotator": "human", "rounds": 1, "methods": ["rs"],
                 "annotation_poll_s": 1}


async def _rounds_until_suspended(api_url: str, runs_root: Path, logs: dict[str, Path]) -> str:
    """The rlhf-rounds deployment with human annotation on the pipeline's run directory (round 0 is the pipeline's
    finished SFT and reward models): round 1 collects its pairs, writes to_label.jsonl and suspends."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        dep = await client.read_deployment_by_name("rlhf-rounds/rlhf-rounds")
        assert dep.parameters["config"]["preset"] == "demo-tiny"
        run = await client.create_flow_run_from_deployment(
            dep.id, parameters={"config": {**ROUNDS_CONFIG, "runs_root": str(runs_root)}})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            run = await client.read_flow_run(run.id)
            if run.state and run.state.name == "Suspended":
                return str(run.id)
            assert not (run.state and run.state.is_final()), f"rlhf-rounds ended {run.state.name}: " \
                f"{run.state.message}\nworker log:\n{logs['worker'].read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"rlhf-rounds still {run.state.name if run.state else None}"
            await asyncio.sleep(2)


async def _state_of(api_url: str, flow_run_id: str):
    from uuid import UUID

    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        return (await client.read_flow_run(UUID(flow_run_id))).state


def _resume_rounds(api_url: str, env: dict[str, str], runs_root: Path, flow_run_id: str, logs: dict[str, Path]
                   ) -> None:
    """After the server and the worker restarted: the run is still suspended; labels through the command line, and
    the worker runs the flow again from its cache to the end of the round."""
    from llama2_align import demo_annotator
    from llama2_align.data import write_jsonl
    from llama2_align.io import read_jsonl

    assert asyncio.run(_state_of(api_url, flow_run_id)).name == "Suspended"
    rounds_dir = runs_root / "demo" / "rounds"
    state = json.loads((rounds_dir / "state.json").read_text())
    assert state["status"] == "paused" and state["paused"]["flow_run_id"] == flow_run_id
    records, _ = demo_annotator.annotate(read_jsonl(rounds_dir / "1" / "collect" / "pairs.jsonl"), seed=3)
    labels = write_jsonl(records, runs_root / "labelled.jsonl")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "rounds", "resume", "demo", "--labels", str(labels),
                           "--runs-root", str(runs_root)], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "resumed flow run" in proc.stdout, proc.stdout + proc.stderr
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (state := asyncio.run(_state_of(api_url, flow_run_id))).is_final():
        assert time.monotonic() < deadline, f"rlhf-rounds still {state.name}:\n{logs['worker'].read_text()[-6000:]}"
        time.sleep(2)
    assert state.is_completed(), f"rlhf-rounds ended {state.name}: {state.message}\n" \
        f"{logs['worker'].read_text()[-6000:]}"
    record = json.loads((rounds_dir / "1" / "round.json").read_text())
    assert record["annotation"]["annotator"] == "human" and record["started_from"].endswith("demo/sft/final")
    assert (rounds_dir / "report.json").is_file()


def test_pipeline_deployment_runs_through_server_and_worker(tmp_path: Path) -> None:
    t0 = time.monotonic()
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path, api_url)
    logs = {"server": tmp_path / "server.log", "worker": tmp_path / "worker.log"}
    procs: list[subprocess.Popen] = []
    try:
        _cli(["server", "database", "upgrade", "-y"], env)
        server = _start(["server", "start", "--host", "127.0.0.1", "--port", str(port)], env, logs["server"])
        procs.append(server)
        _wait_healthy(api_url, server, logs["server"])
        print(f"\n[e2e] server healthy after {time.monotonic() - t0:.0f}s")

        _cli(["work-pool", "create", POOL, "--type", "process"], env)
        _cli(["concurrency-limit", "create", "gpu", "1"], env)
        _cli(["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)
        print(f"[e2e] deployed after {time.monotonic() - t0:.0f}s")

        # up to 4 flow runs at once: the `gpu` tag limit (1 slot), not the worker, serialises the heavy stages
        worker = _start(["worker", "start", "--pool", POOL, "--limit", str(LOAD_RUNS)], env, logs["worker"])
        procs.append(worker)

        asyncio.run(_exercise(api_url, tmp_path / "runs", logs))
        print(f"[e2e] pipeline and eval done after {time.monotonic() - t0:.0f}s")

        # Iterative rounds with human labels: the run suspends (no worker held), survives a restart of the server
        # and of the worker, and goes on once the labels are given.
        flow_run_id = asyncio.run(_rounds_until_suspended(api_url, tmp_path / "runs", logs))
        print(f"[e2e] rlhf-rounds suspended after {time.monotonic() - t0:.0f}s")
        for proc in reversed(procs):
            _stop(proc)
        procs.clear()
        server = _start(["server", "start", "--host", "127.0.0.1", "--port", str(port)], env, logs["server"])
        procs.append(server)
        _wait_healthy(api_url, server, logs["server"])
        procs.append(_start(["worker", "start", "--pool", POOL, "--limit", "1"], env, logs["worker"]))
        _resume_rounds(api_url, env, tmp_path / "runs", flow_run_id, logs)
        print(f"[e2e] done after {time.monotonic() - t0:.0f}s")
    finally:
        for proc in reversed(procs):
            _stop(proc)
