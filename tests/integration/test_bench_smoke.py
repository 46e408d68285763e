"""The one-script GPU check runs its code paths on a CPU (a smoke run), so it cannot rot unseen between the
occasions a GPU is at hand: every part (rollout, training and scoring, the PPO stage, the PPO stage under torchrun
with FSDP) runs, writes its figures, and the goals table names every figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_on_cpu():
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--preset", "micro", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    table = proc.stdout[proc.stdout.index("goals on"):]
    for row in ("rollout ms/step, batch 32", "SFT MFU", "RM MFU", "RM scoring MFU (2N", "PPO, 2 iterations (LoRA",
                "FSDP step, world size 1, torchrun"):
        assert row in table, table
    assert "n/a" in table  # no MFU claimed on a CPU
    assert "FAILED" not in table and "fsdp x1" in table  # the FSDP part really sharded (FSDP2 at world size 1)
