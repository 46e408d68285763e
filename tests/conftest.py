"""Shared test set-up: offline, a private PREFECT_HOME, and a session-wide Prefect test server on request."""

from __future__ import annotations

import os
import shutil
import tempfile

# Before anything imports prefect or transformers: no network, and Prefect's state (results, database) in a temp dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_PREFECT_HOME = tempfile.mkdtemp(prefix="llama2-align-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server (with its own SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)
