"""Start the local Prefect API server in parallel with the heavy imports, instead of after them.

With no API URL configured, Prefect starts a temporary API server in a subprocess the first time a flow talks to
the API, and the flow's first line waits for it: 4-7 s on a small machine (the server process imports FastAPI,
SQLAlchemy and Prefect's server and opens the database; the caller first imports Prefect's server module too).
``llama2-align run`` instead calls :func:`start_early` before it imports torch, transformers and the flows: that
launches the same server (Prefect's own app factory, with the environment Prefect gives its temporary server: no
UI, ephemeral services, the same PREFECT_HOME database) on a free 127.0.0.1 port, without importing Prefect. Once
Prefect is imported, :func:`adopt` checks Prefect's settings: when Prefect would have started a temporary server
itself (no API URL from any settings source, ephemeral mode on), it waits for ours to answer and points
PREFECT_API_URL at it; otherwise it stops ours and Prefect behaves as without this module. The server is stopped at
exit, after Prefect's own exit handlers have flushed logs and events to it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llama2_align.procs import die_with_parent

_proc: subprocess.Popen | None = None
_port: int | None = None
_adopted = False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch() -> None:
    global _proc, _port
    spec = importlib.util.find_spec("prefect")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return
    app_dir = str(Path(list(spec.submodule_search_locations)[0]).parent)
    _port = _free_port()
    _proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(_port), "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        preexec_fn=die_with_parent(signal.SIGTERM),  # no orphan server when the command line is killed (SIGKILL)
    )


def start_early() -> None:
    """Launch the server in the background (once; not when PREFECT_API_URL is set). Call before importing Prefect."""
    if _proc is not None or os.environ.get("PREFECT_API_URL"):
        return
    # Registered before Prefect is imported, so it runs after Prefect's own exit handlers (they flush to the server).
    atexit.register(stop)
    _launch()


def _healthy(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    relaunches = 0
    while time.monotonic() < deadline:
        if _proc is None:
            return False
        if _proc.poll() is not None:  # e.g. the port was taken between choosing and binding it
            if relaunches >= 2:
                return False
            relaunches += 1
            _launch()
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{_port}/api/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def adopt() -> str | None:
    """After Prefect is imported, before the first flow: use the early server if Prefect would otherwise start its
    own temporary one. Returns the API URL used, or None (the early server, if any, is stopped)."""
    global _adopted
    if _proc is None:
        return None
    from prefect.context import refresh_global_settings_context
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or \
            not _healthy(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())):
        stop()  # a configured server, ephemeral mode off, or ours did not come up: Prefect decides as usual
        return None
    url = f"http://127.0.0.1:{_port}/api"
    os.environ["PREFECT_API_URL"] = url  # child processes (task workers, torchrun ranks) inherit it
    refresh_global_settings_context()
    _adopted = True
    return url


def adopted() -> bool:
    """True when this process's flows talk to the server started here (a local, temporary one)."""
    return _adopted


def stop() -> None:
    """Stop the early server (SIGTERM, then SIGKILL after 5 s, as Prefect stops its temporary server)."""
    global _proc, _adopted
    proc, _proc = _proc, None
    if proc is None:
        return
    if _adopted and os.environ.get("PREFECT_API_URL", "").startswith(f"http://127.0.0.1:{_port}/"):
        os.environ.pop("PREFECT_API_URL", None)
    _adopted = False
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
