"""What every stage shares: the stage directory, result.json with provenance, metrics logs, checkpoints, resume.

Stage directory (DESIGN.md §1)::

    <stage>/checkpoint-<step>/   intermediate checkpoints, each renamed into place only once complete
    <stage>/final/               the stage's output model
    <stage>/metrics.jsonl        one JSON object per logged step
    <stage>/result.json          written last, atomically: the stage is complete iff it exists
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, Field

from ..io import atomic_write_json, hash_path, read_jsonl

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
STAGING_DIR = ".staging"  # checkpoints are assembled here, then renamed into place whole
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

ProgressFn = Callable[[dict], None]  # called with {"stage", "step", "total", "metrics"...} as training goes


class StageResult(BaseModel):
    """What a stage returns and writes to result.json. Small: paths and numbers, never tensors."""

    stage: str
    status: str = "completed"
    out_dir: str
    final: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    steps: int = 0
    duration_s: float = 0.0
    artifacts: dict[str, str] = Field(default_factory=dict)  # name -> path inside out_dir (plots, samples, tables)
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank under torchrun (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_result(out_dir: str | Path) -> StageResult | None:
    """The stage's result if it completed (result.json exists), else None."""
    path = Path(out_dir) / RESULT_FILE
    if not path.exists():
        return None
    return StageResult.model_validate_json(path.read_text())


def write_result(result: StageResult) -> StageResult:
    """Mark the stage complete (result.json, written last) and drop its checkpoint staging area."""
    if is_main_process():
        atomic_write_json(Path(result.out_dir) / RESULT_FILE, result.model_dump())
        shutil.rmtree(Path(result.out_dir) / STAGING_DIR, ignore_errors=True)
    return result


def fingerprint(path: str | Path) -> str:
    """A content hash for a stage input.

    A finished stage directory is identified by its result.json (which holds its own inputs' hashes, so the chain
    is a Merkle chain); a model directory over 1 GiB by its file names, sizes and mtimes (hashing 130 GB of 70B
    weights on every run is not acceptable); anything else by its full contents.
    """
    path = Path(path)
    if path.is_dir() and (path / RESULT_FILE).exists():
        return "result:" + hash_path(path / RESULT_FILE)
    if path.is_dir() and (path.parent / RESULT_FILE).exists():  # e.g. <stage>/final
        return "result:" + hash_path(path.parent / RESULT_FILE) + ":" + path.name
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if sum(p.stat().st_size for p in files) > 2**30:
            import hashlib

            h = hashlib.sha256()
            for p in files:
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            return "stat:" + h.hexdigest()
    return "sha256:" + hash_path(path)


def input_fingerprints(inputs: dict[str, Any]) -> dict[str, Any]:
    """Hash every input that is a path on disk; presets and other values are kept as they are."""
    out = {}
    for name, value in inputs.items():
        if value is None:
            out[name] = None
        elif isinstance(value, (str, Path)) and Path(value).exists():
            out[name] = {"path": str(Path(value).resolve()), "hash": fingerprint(value)}
        else:
            out[name] = value
    return out


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "prefect", "datasets", "llama2-align"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    from ..device import describe_device, resolve_device

    device = resolve_device("auto") if device is None else torch.device(device)
    return {
        "versions": library_versions(),
        "git_commit": _git_commit(),
        "device": describe_device(device),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "host": platform.node(),
        "pid": os.getpid(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``checkpoint-<step>``, renamed into place when complete), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    if keep <= 0 or not is_main_process():
        return
    for _, path in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def truncate_metrics(out_dir: str | Path, after_step: int) -> None:
    """On resume, drop logged lines past the checkpoint we resume from, so no step appears twice."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists() or not is_main_process():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
