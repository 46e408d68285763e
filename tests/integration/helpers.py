"""Helpers shared by the integration tests that start real processes (not tests themselves)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _servers_of(home: Path) -> list[int]:
    """PIDs of Prefect API server processes whose PREFECT_HOME is ``home``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in cmd and f"PREFECT_HOME={home}".encode() in env.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PYTHONPATH=str(ROOT), **extra)
    return env


def latest_artifact(key: str) -> str:
    """The newest Prefect artifact with this key, read from the API the test's environment points at."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return sorted(found, key=lambda a: a.created)[-1].data

    return asyncio.run(read())


async def wait_for_task_runs(client, flow_run_ids, done, timeout_s: float = 60.0) -> list:
    """The task runs of these flow runs, read again until ``done(task_runs)`` holds or ``timeout_s`` passes.

    Prefect 3 records a task run's states from the events its flow sends, a moment after they happen, so a read made
    as soon as the flow run has ended can miss its last task run or see it still Running."""
    import asyncio
    import time

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids)))
    deadline = time.monotonic() + timeout_s
    while True:
        runs = await client.read_task_runs(flow_run_filter=flow_runs)
        if done(runs) or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.5)


def finished(names):
    """A ``done`` for wait_for_task_runs: every one of these task names has a run in a final state."""
    return lambda runs: set(names) <= {r.name for r in runs if r.state is not None and r.state.is_final()}


def task_runs(flow_run_id, names) -> list:
    """The task runs of one flow run, once each of ``names`` has a run in a final state (see wait_for_task_runs)."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await wait_for_task_runs(client, [flow_run_id], finished(names))

    return asyncio.run(read())


def task_states(flow_run_id, names) -> dict[str, str]:
    """{task name: state name} of one flow run, once each of ``names`` has finished (see wait_for_task_runs)."""
    return {r.name: r.state.name for r in task_runs(flow_run_id, names)}
