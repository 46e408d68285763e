"""The local API server that `llama2-align run` starts before its heavy imports (flows/local_api.py): it is adopted
only when Prefect would start a temporary server itself, flows run against it and are recorded in PREFECT_HOME's
database, and no server process outlives the run."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.helpers import _env, _servers_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


SCRIPT = textwrap.dedent("""
    from flows import local_api
    local_api.start_early()
    started = local_api._proc is not None
    from prefect import flow
    url = local_api.adopt()
    print("STARTED", started, "URL", url, flush=True)

    @flow(name="local-api-probe")
    def probe():
        from prefect.settings import PREFECT_API_URL
        return PREFECT_API_URL.value()

    if url:
        print("FLOW_API", probe(), flush=True)
""")


def test_flow_runs_against_the_early_server_and_it_stops_at_exit(home):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(home), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("STARTED"))
    assert line.startswith("STARTED True URL http://127.0.0.1:"), line
    url = line.split("URL ")[1]
    assert f"FLOW_API {url}" in proc.stdout  # the flow talked to our server, not a second temporary one
    assert _servers_of(home) == []
    with sqlite3.connect(home / "prefect.db") as db:
        states = db.execute("select state_type from flow_run where name is not null and flow_id in "
                            "(select id from flow where name = 'local-api-probe')").fetchall()
    assert states == [("COMPLETED",)]


def test_a_configured_api_url_wins(home, tmp_path):
    # an API URL from the active profile (not the environment): the early server is stopped, Prefect's choice stands
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(home, PREFECT_PROFILES_PATH=str(profiles)),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STARTED True URL None" in proc.stdout
    assert _servers_of(home) == []
    # and with PREFECT_API_URL in the environment nothing is started at all
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(home, PREFECT_API_URL="http://127.0.0.1:9/api"),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STARTED False URL None" in proc.stdout


def test_cli_run_bad_option_leaves_no_server(home):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "demo-micro", "--set",
                           "ppo.iterations=-3"], env=_env(home), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 2 and "iterations" in proc.stderr
    assert _servers_of(home) == []


def test_cli_run_records_the_pipeline_and_its_logs(home, tmp_path):
    """`make demo`'s command on the micro world: every task run recorded COMPLETED in PREFECT_HOME's database, the
    run's INFO logs shipped to the API (the UI's Logs tab) while the console shows no Prefect INFO lines, and no
    server left running."""
    env = _env(home)
    env.pop("PREFECT_LOGGING_LEVEL", None)
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)  # the CLI's own default applies
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "demo-micro", "--runs-root",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "stage ppo: done" in proc.stdout and (tmp_path / "demo" / "report.json").exists()
    assert " | INFO " not in proc.stdout + proc.stderr
    assert _servers_of(home) == []
    with sqlite3.connect(home / "prefect.db") as db:
        (run_id, state), = db.execute("select id, state_type from flow_run where flow_id in "
                                      "(select id from flow where name = 'rlhf-pipeline') and parameters like ?",
                                      (f"%{tmp_path}%",)).fetchall()  # the home is shared with other tests
        tasks = db.execute("select name, state_type from task_run where flow_run_id = ?", (run_id,)).fetchall()
        logs = [m for (m,) in db.execute("select message from log where flow_run_id = ?", (run_id,))]
    assert state == "COMPLETED"
    assert {n for n, _ in tasks} >= {"sft", "reward-helpfulness", "reward-safety", "ppo", "eval", "report"}
    assert all(s == "COMPLETED" for _, s in tasks), tasks
    assert any("stage sft: done" in m for m in logs) and any(m.startswith("ppo step") for m in logs), logs[:20]
