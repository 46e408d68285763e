"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

An out-of-memory killer sends SIGKILL: the parent gets no chance to stop its children, and a local API server or a
torchrun agent would live on as an orphan. On Linux the kernel can send a child a signal of our choice when its
parent dies (``prctl(PR_SET_PDEATHSIG)``), set in the child between fork and exec. Elsewhere the children are
stopped by the parent's exit handlers only (no SIGKILL protection). Imports nothing heavy: the command line uses it
before it imports torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_watching = False


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except OSError:  # pragma: no cover - a Linux without a C library to load
        return None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies. True when it could (Linux)."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    return True


def exit_when_parent_dies(poll_s: float = 1.0) -> None:
    """A watchdog thread for a process whose starter may not be a thread that outlives it (a process-pool worker):
    when the parent process is gone (this process was re-parented), exit at once."""
    import threading
    import time

    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-when-parent-dies", daemon=True).start()


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when the process that started it dies.

    The signal follows the *thread* that forked the child, so start such children from a thread that outlives
    them (the main thread, or the thread that also waits for them). If the parent is already gone when the child
    starts, the child stops at once."""
    parent = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), sig)

    return preexec
