"""What every stage task shares: retry policy, OOM back-off, the cache key, progress reporting, the task body.

A stage task is thin: it calls the library's ``run_<stage>(config, inputs, out_dir, progress)`` through
:func:`run_stage`, which adds the orchestration concerns and nothing else.

Caching. The key is the stage name, the stage directory, the config and the content hashes of the inputs (a finished
upstream stage is hashed by its result.json, so the chain of keys is a Merkle chain). A cached task returned paths,
and Prefect would trust them blindly, so the key also holds the stage directory's *cache token*: a random id kept
in ``<out_dir>/.prefect-cache-token``. The token is renewed whenever the key is computed and ``result.json`` is
missing (first run, a crashed run, a deleted directory): the key is then new, nothing cached can match it, and the
stage runs. Once the stage has finished, the token stays, the key is stable and later flow runs are served from the
cache (state "Cached"). Prefect 3.9 decides ``refresh_cache`` before it computes the key, per task object, so the
token (computed inside ``cache_key_fn``) is the way to make the check per call, also for ``.submit()`` and
``with_options()`` copies.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from pydantic import BaseModel, ValidationError

from llama2_align.errors import InputError
from llama2_align.launch import LaunchError, launch_stage, should_launch
from llama2_align.procs import exit_when_parent_dies
from llama2_align.stages.common import RESULT_FILE, StageResult, input_fingerprints
from llama2_align.tracking import TrackingSettings, track_stage

from .artifacts import artifact_key, publish_stage_artifacts

C = TypeVar("C", bound=BaseModel)

CACHE_TOKEN_FILE = ".prefect-cache-token"
RETRIES = 2
RETRY_DELAY_S = [30, 120]

# Errors that say the request is wrong: retrying cannot help, and the message must reach the UI as it is. Only the
# project's own (llama2_align.errors) and pydantic's: a ValueError raised inside a library is a failure, not bad input.
VALIDATION_ERRORS: tuple[type[BaseException], ...] = (InputError, ValidationError)
# OSErrors that are about the request, not a hiccup.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# RuntimeError messages of a lost or failing device (driver resets, Xid errors, NCCL timeouts).
_LOST_DEVICE_MARKERS = ("CUDA error", "CUDA driver", "NCCL error", "NCCL communicator", "ncclUnhandledCudaError",
                        "ncclSystemError", "ncclInternalError", "ncclRemoteError", "Watchdog caught collective",
                        "device-side", "ECC error", "unspecified launch failure", "no CUDA-capable device")


class OutOfMemoryAtMicroBatchOne(RuntimeError):
    """Out of memory with nothing left to halve. Not transient: retrying would fail the same way."""


# --------------------------------------------------------------------------------------------------------------------
# Error classification
# --------------------------------------------------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def is_validation_error(exc: BaseException) -> bool:
    # a stage launched under torchrun whose rank refused its inputs fails as a LaunchError (a RuntimeError)
    return isinstance(exc, VALIDATION_ERRORS) or bool(getattr(exc, "validation_error", False))


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: CUDA OOM, a lost device, I/O hiccups. Never a validation error."""
    if exc is None or isinstance(exc, OutOfMemoryAtMicroBatchOne) or is_validation_error(exc):
        return False
    if isinstance(exc, LaunchError) and exc.error:
        # A launched stage: judge by the failing rank's own error, not by the whole output tail (NCCL and CUDA
        # print their set-up lines there on every run, so a plain bug would read as a lost device).
        kind, msg = str(exc.error.get("type", "")), str(exc.error.get("message", ""))
        return kind.endswith("OutOfMemoryError") or "CUDA out of memory" in msg or \
            any(m in msg for m in _LOST_DEVICE_MARKERS)
    if is_oom(exc):
        return True
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):  # TimeoutError/ConnectionError are OSErrors too
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _LOST_DEVICE_MARKERS)


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only the failures :func:`is_transient` accepts."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result could not be read back: judge by that error
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


# --------------------------------------------------------------------------------------------------------------------
# OOM back-off
# --------------------------------------------------------------------------------------------------------------------

def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_backoff(fn: Callable[[C], Any], config: C, warn: Callable[[str], None] = print,
                         stage: str = "stage") -> tuple[Any, C]:
    """Call ``fn(config)``; on out-of-memory call it again with ``config.smaller()`` (the ``Backoff`` protocol of
    ``llama2_align.stages.common``: half the memory per step, the same effective batch) until nothing is left to
    halve. Returns ``(result, the config that worked)``. A config without ``smaller`` is run once as it is."""
    if not hasattr(config, "smaller"):
        return fn(config), config
    while True:
        try:
            return fn(config), config
        except Exception as exc:
            if not is_oom(exc):
                raise
            smaller = config.smaller()
            if smaller is None:
                raise OutOfMemoryAtMicroBatchOne(
                    f"{stage}: out of memory at {config.batch_summary()}; nothing left to halve. Use LoRA, "
                    "gradient checkpointing, a shorter max_length or more GPUs.") from exc
            warn(f"{stage}: out of memory at {config.batch_summary()}; retrying with {smaller.batch_summary()}: "
                 f"{str(exc)[:200]}")
            del exc
            _free_device_memory()
            config = smaller


# --------------------------------------------------------------------------------------------------------------------
# Cache key
# --------------------------------------------------------------------------------------------------------------------

def cache_token(out_dir: str | Path) -> str:
    """The stage directory's cache token; renewed (and written) when result.json is missing. See the module doc."""
    out_dir = Path(out_dir)
    token_file = out_dir / CACHE_TOKEN_FILE
    if (out_dir / RESULT_FILE).exists() and token_file.exists():
        return token_file.read_text().strip()
    token = uuid.uuid4().hex
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = token_file.with_name(f"{CACHE_TOKEN_FILE}.{token}.tmp")
    tmp.write_text(token + "\n")
    tmp.replace(token_file)
    return token


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def stage_cache_key(stage: str, config: Any, inputs: Any, out_dir: str | Path) -> str:
    """Hash of stage + stage directory + config + input content hashes + the directory's cache token."""
    payload = {
        "stage": stage,
        "out_dir": str(Path(out_dir).resolve()),
        "config": _dump(config),
        "inputs": input_fingerprints(_dump(inputs)),
        "token": cache_token(out_dir),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return f"{stage}-{hashlib.sha256(blob).hexdigest()}"


def stage_name_of(config: Any, task_name: str) -> str:
    kind = getattr(config, "kind", None)
    return f"{task_name}-{kind}" if kind and task_name == "reward" else task_name


def stage_cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn`` for tasks with ``(config, inputs, out_dir)`` parameters."""
    config = parameters["config"]
    return stage_cache_key(stage_name_of(config, context.task.name), config, parameters["inputs"],
                           parameters["out_dir"])


GPU_TAG = "gpu"


def gpu_tags() -> list[str]:
    """``["gpu"]`` for the heavy stage tasks where a worker's one-task-per-GPU concurrency limit should apply: when
    ``LLAMA2_ALIGN_GPU_TAG=1`` (the deployments' job environment sets it) or, unless it is ``0``, when a GPU is
    visible. Off for the embedded CPU demo: each tagged task run asks the API for a concurrency slot (about 1 s a
    task here) even when no limit exists."""
    flag = os.environ.get("LLAMA2_ALIGN_GPU_TAG")
    if flag in ("0", "1"):
        return [GPU_TAG] if flag == "1" else []
    import torch

    return [GPU_TAG] if torch.cuda.is_available() else []


# The options every stage task shares (spread into ``@task(...)``); read when the task modules are imported.
STAGE_TASK_OPTIONS: dict[str, Any] = dict(
    tags=gpu_tags(),
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAY_S,
    retry_condition_fn=retry_transient,
    cache_key_fn=stage_cache_key_fn,
    persist_result=True,
)


# --------------------------------------------------------------------------------------------------------------------
# Progress and the task body
# --------------------------------------------------------------------------------------------------------------------

PROGRESS_EVERY_S = 5.0


MAIN_METRICS = ("loss", "reward_combined", "eval_loss", "accuracy", "checkpoint")  # the one the console shows


class ConsoleProgress:
    """A stage's progress on the console: a live line on a terminal (step/total, the main metric, elapsed time and
    ETA; tqdm), one line per ``every_percent`` otherwise (a log file, a worker's output)."""

    def __init__(self, stage: str, every_percent: float = 10.0, stream=None):
        self.stage = stage
        self.every = every_percent
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.start = time.monotonic()
        self.bar = None
        self.next_percent = every_percent
        self.last_step = 0

    def show(self, step: int, total: int, metrics: dict) -> None:
        main = next(((k, metrics[k]) for k in MAIN_METRICS if k in metrics), None)
        shown = "" if main is None else f"{main[0]}={main[1]:.4g}" if isinstance(main[1], float) else \
            f"{main[0]}={main[1]}"
        if self.live:
            from tqdm import tqdm

            if self.bar is None or self.bar.total != total:
                self.close()
                self.bar = tqdm(total=total, desc=self.stage, unit="step", file=self.stream, dynamic_ncols=True,
                                leave=True)
            self.bar.n = min(step, total)
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.refresh()
            return
        percent = 100.0 * min(step, total) / total
        if step <= self.last_step or (percent + 1e-9 < self.next_percent and step < total):
            return  # one line per `every` percent, and one per step at most (an eval event repeats the step)
        self.last_step = step
        while self.next_percent <= percent:
            self.next_percent += self.every
        elapsed = time.monotonic() - self.start
        eta = elapsed * (total - step) / step if step else float("nan")
        print(f"[{time.strftime('%H:%M:%S')}] {self.stage}: {percent:3.0f}% (step {step}/{total}) {shown} "
              f"elapsed {_duration(elapsed)}, eta {_duration(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: not known yet
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


class PrefectProgress:
    """The library's ``progress`` callback: a log line per logged step, the progress artifact and the console line
    (both from the same events, so they agree), and the stage's warnings."""

    def __init__(self, stage: str, logger=None):
        self.stage = stage
        self.logger = logger or get_run_logger()
        self._last_update = float("-inf")
        self.console = ConsoleProgress(stage)
        self.artifact_id = create_progress_artifact(0.0, key=artifact_key(stage, "progress"),
                                                    description=f"{stage}: training progress")

    def __call__(self, event: dict) -> None:
        if "warning" in event:
            self.logger.warning(event["warning"])
            return
        step, total = int(event.get("step", 0)), int(event.get("total") or 0)
        metrics = {k: v for k, v in (event.get("metrics") or {}).items() if k not in ("step",)}
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self.logger.info(f"{self.stage} step {step}/{total or '?'} {shown}")
        if total > 0:
            self.console.show(step, total, metrics)
        # The artifact is a synchronous API call: at most one every few seconds (and the last step), so a fast run
        # does not pay a round trip per logged step.
        now = time.monotonic()
        if total > 0 and (now - self._last_update >= PROGRESS_EVERY_S or step >= total):
            self._last_update = now
            self.update(100.0 * min(step, total) / total, f"{self.stage}: step {step} of {total}")

    def update(self, percent: float, description: str | None = None) -> None:
        try:
            update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:  # progress is a convenience: never fail a training run over it
            self.logger.debug(f"progress artifact update failed: {exc!r}")

    def close(self) -> None:
        self.console.close()


def run_stage(stage: str, run_fn: Callable[..., StageResult], config: C, inputs: BaseModel, out_dir: str | Path,
              tracking: TrackingSettings | None = None) -> dict:
    """The body of every stage task: run the library stage with OOM back-off and progress, publish artifacts,
    return the StageResult as a dict. Validation errors are logged and re-raised (their message is the state's).
    With ``tracking``, the progress events and the result also go to the trackers (``llama2_align.tracking``)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # a process-pool worker (the concurrent reward models)
        exit_when_parent_dies()
    logger = get_run_logger()
    logger.info(f"{stage}: inputs {inputs.model_dump()} -> {out_dir}")
    with track_stage(tracking, stage, config, out_dir) as tracked:
        prefect_progress = PrefectProgress(stage, logger)

        def progress(event: dict) -> None:
            prefect_progress(event)
            tracked.progress(event)

        def call(cfg):
            if should_launch(cfg):  # several processes: torchrun as a subprocess; an OOM reads "CUDA out of memory"
                return launch_stage(stage, cfg, inputs, out_dir, cfg.num_processes, log=logger.info,
                                    progress=progress)
            return run_fn(cfg, inputs, out_dir, progress=progress)

        try:
            result, used = run_with_oom_backoff(call, config, warn=logger.warning, stage=stage)
        except Exception as exc:
            prefect_progress.close()
            if is_validation_error(exc):
                logger.error(f"{stage}: refused its inputs (not retried): {exc}")
            elif is_transient(exc):
                logger.warning(f"{stage}: transient failure, Prefect may retry (resuming from the last checkpoint): "
                               f"{exc!r}")
            else:
                logger.error(f"{stage}: failed: {exc!r}")
            raise
        tracked.finish(result)
    if used is not config:
        logger.warning(f"{stage}: finished with {used.batch_summary()} after OOM back-off")
    prefect_progress.close()
    prefect_progress.update(100.0, f"{stage}: done ({result.steps} steps)")
    publish_stage_artifacts(result, tracking_link=tracked.link)
    logger.info(f"{stage}: done in {result.duration_s:.1f}s, output {result.final or result.out_dir}")
    return result.model_dump(mode="json")
