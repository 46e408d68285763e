"""Experiment tracking, opt-in: MLflow and TensorBoard behind one small interface (README, "Experiment tracking").

A pipeline config asks for it with ``tracking: [mlflow, tensorboard]``; :func:`llama2_align.pipeline.resolve` turns
that into :class:`TrackingSettings` (the MLflow URI defaults to a SQLite file under the runs root, artifacts beside
it). Nothing here is called from inside a stage: tracking hooks onto the two places every stage already reports to,
its progress events (``StageRun.report``: SFT and reward-model log lines, PPO iterations, eval checkpoints; they also
cross the torchrun boundary as marked lines) and its final ``StageResult``. :func:`track_stage` wraps one stage run
(an MLflow run nested under the pipeline's, and TensorBoard event files in ``<stage>/tensorboard/``);
:func:`open_run` opens the pipeline's own run. With no backend asked for, every call is a no-op.

MLflow is used through ``MlflowClient`` only (explicit run ids, no process-global "active run"), so stages in
worker processes log into the right run. Once a run is open, a failed logging call is a warning, never a failed
training run; opening one (a missing package, an unreachable server) is an error, before any stage runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError

Backend = Literal["mlflow", "tensorboard"]
BACKEND_PACKAGES: dict[str, str] = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
DEFAULT_EXPERIMENT = "llama2-align"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs

_MAX_PARAMS, _MAX_METRICS, _MAX_PARAM_CHARS = 100, 1000, 6000  # MLflow's log_batch and value limits
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")
log = logging.getLogger(__name__)


class TrackingSettings(BaseModel):
    """Where a run's params, metrics and artifacts go. Small and picklable: it travels to the stage tasks."""

    model_config = ConfigDict(extra="forbid")

    backends: list[Backend] = Field(default_factory=list, description="mlflow, tensorboard, or both")
    uri: str | None = Field(None, description="MLflow tracking URI (sqlite:///..., http://host:port, a directory)")
    experiment: str = DEFAULT_EXPERIMENT
    artifact_root: str | None = Field(None, description="MLflow artifact location of a new experiment (local URIs)")
    parent_run_id: str | None = Field(None, description="the MLflow run a new run is nested under")

    @property
    def enabled(self) -> bool:
        return bool(self.backends)


def default_settings(backends: list[str], runs_root: str | Path, uri: str | None = None,
                     experiment: str = DEFAULT_EXPERIMENT) -> TrackingSettings:
    """The settings a pipeline config resolves to: MLflow on ``sqlite:///<runs_root>/mlflow.db`` with artifacts in
    ``<runs_root>/mlartifacts`` unless a URI is given. Refuses a backend whose package is not installed."""
    backends = list(dict.fromkeys(backends))
    for name in backends:
        if name not in BACKEND_PACKAGES:
            raise ConfigError(f"tracking: unknown backend {name!r}; expected one of {', '.join(BACKEND_PACKAGES)}")
        if find_spec(BACKEND_PACKAGES[name]) is None:
            raise ConfigError(f"tracking: {name} is asked for but the {BACKEND_PACKAGES[name]!r} package is not "
                              f"installed; pip install 'llama2-align[tracking]' (or drop {name} from tracking)")
    root = Path(runs_root).resolve()
    artifact_root = None
    if uri is None and "mlflow" in backends:
        uri = f"sqlite:///{root / MLFLOW_DB}"
    if uri is not None and not is_remote(uri):
        artifact_root = (root / MLFLOW_ARTIFACTS).as_uri()
    return TrackingSettings(backends=backends, uri=uri, experiment=experiment, artifact_root=artifact_root)


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


# --------------------------------------------------------------------------------------------------------------------
# The interface and its backends
# --------------------------------------------------------------------------------------------------------------------


class Tracker(Protocol):
    """One tracked run (a pipeline run or one stage of it)."""

    run_id: str | None  # the MLflow run id, when MLflow is one of the backends

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened (``lora.r``) and logged once; values as text."""

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Every numeric leaf (``checkpoints.ppo.violation_rate``; bools as 0/1; a ``[lo, hi]`` pair as two)."""

    def log_artifact(self, path: str | Path) -> None:
        """A file, copied into the run."""

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED or FAILED."""


class NullTracker:
    """Tracking off: every call does nothing."""

    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path):
        pass

    def end(self, status="FINISHED"):
        pass


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [0.1, 0.2]}`` -> ``{"a.b": 1, "c": [0.1, 0.2]}`` (leaves kept as they are)."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, (dict, BaseModel)) else {name: value})
    return out


def numeric_leaves(metrics: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of a (nested) metrics dict: finite numbers, bools as 0/1, ``[lo, hi]`` as ``.lo``/``.hi``;
    text and other lists are left out. Keys are made acceptable to MLflow."""
    out: dict[str, float] = {}
    for key, value in flatten(metrics).items():
        if key == "step":
            continue
        pairs = [(key, value)]
        if isinstance(value, (list, tuple)) and len(value) == 2:
            pairs = [(f"{key}.lo", value[0]), (f"{key}.hi", value[1])]
        for name, v in pairs:
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[_METRIC_KEY_BAD.sub("_", name)[:250]] = float(v)
    return out


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM_CHARS]


class MlflowTracker:
    """An MLflow run, through ``MlflowClient`` (a server, a SQLite file or a directory)."""

    def __init__(self, settings: TrackingSettings, name: str, tags: dict[str, str]):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline by default: no usage pings
        from mlflow.tracking import MlflowClient

        self.settings = settings
        self.client = MlflowClient(tracking_uri=settings.uri)
        self.experiment_id = _experiment_id(self.client, settings)
        all_tags = dict(tags)
        if settings.parent_run_id:
            all_tags[PARENT_TAG] = settings.parent_run_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k[:250], _param_text(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + _MAX_PARAMS])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in numeric_leaves(metrics).items()]
        for i in range(0, len(items), _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + _MAX_METRICS])

    def log_artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status="FINISHED"):
        self.client.set_terminated(self.run_id, status=status)


def _experiment_id(client, settings: TrackingSettings) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(settings.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(settings.experiment, artifact_location=settings.artifact_root)
    except MlflowException:  # another process created it first
        found = client.get_experiment_by_name(settings.experiment)
        if found is None:
            raise
        return found.experiment_id


class TensorBoardTracker:
    """TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``): scalars per step, the params as text."""

    run_id = None

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params):
        text = json.dumps(flatten(params), indent=2, sort_keys=True, default=str)
        self.writer.add_text("params", "```\n" + text + "\n```")

    def log_metrics(self, metrics, step):
        for key, value in numeric_leaves(metrics).items():
            self.writer.add_scalar(key, value, int(step))

    def log_artifact(self, path):
        pass  # files stay where they are, beside the event files

    def end(self, status="FINISHED"):
        self.writer.close()


class MultiTracker:
    """The backends asked for, as one tracker. After opening, a failing call is a warning, never an error."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.run_id = next((t.run_id for t in trackers if t.run_id), None)

    def _each(self, method: str, *args) -> None:
        for t in self.trackers:
            try:
                getattr(t, method)(*args)
            except Exception as exc:  # tracking is a record of the run: it must not end the run
                log.warning(f"tracking: {type(t).__name__}.{method} failed: {exc!r}")

    def log_params(self, params):
        self._each("log_params", params)

    def log_metrics(self, metrics, step):
        self._each("log_metrics", metrics, step)

    def log_artifact(self, path):
        if Path(path).is_file():
            self._each("log_artifact", path)

    def end(self, status="FINISHED"):
        self._each("end", status)


def open_run(settings: TrackingSettings | None, name: str, log_dir: str | Path, tags: dict[str, str] | None = None
             ) -> MultiTracker | NullTracker:
    """A run on every backend ``settings`` asks for (TensorBoard files in ``log_dir``), or a :class:`NullTracker`."""
    if settings is None or not settings.enabled:
        return NullTracker()
    trackers: list = []
    if "mlflow" in settings.backends:
        trackers.append(MlflowTracker(settings, name, tags or {}))
    if "tensorboard" in settings.backends:
        trackers.append(TensorBoardTracker(Path(log_dir) / TENSORBOARD_DIR))
    return MultiTracker(trackers)


def child_settings(settings: TrackingSettings | None, parent: MultiTracker | NullTracker) -> TrackingSettings | None:
    """The settings for runs nested under ``parent`` (the pipeline run's stages)."""
    if settings is None or not settings.enabled:
        return None
    return settings.model_copy(update={"parent_run_id": parent.run_id})


def run_link(settings: TrackingSettings | None, run_id: str | None) -> str | None:
    """Where to see an MLflow run: its URL on a tracking server, else its id and the ``mlflow ui`` command."""
    if settings is None or not run_id or "mlflow" not in settings.backends:
        return None
    if settings.uri and is_remote(settings.uri):
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri=settings.uri).get_run(run_id).info.experiment_id
        return f"{settings.uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"run `{run_id}` (experiment `{settings.experiment}`): `mlflow ui --backend-store-uri {settings.uri}`"


# --------------------------------------------------------------------------------------------------------------------
# A stage run
# --------------------------------------------------------------------------------------------------------------------


class StageTracking:
    """The trackers of one stage run: :meth:`progress` is a stage ``progress`` callback (per-step metrics),
    :meth:`finish` logs the final result (its metrics and files)."""

    def __init__(self, tracker: MultiTracker | NullTracker, settings: TrackingSettings | None):
        self.tracker = tracker
        self.settings = settings

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    @property
    def link(self) -> str | None:
        try:
            return run_link(self.settings, self.run_id)
        except Exception as exc:
            log.warning(f"tracking: no link to run {self.run_id}: {exc!r}")
            return None

    def progress(self, event: dict) -> None:
        metrics = event.get("metrics") or {}
        self.tracker.log_metrics(metrics, int(event.get("step") or 0))

    def finish(self, result) -> None:
        """``result``: the stage's ``StageResult``. Final metrics at its last step, result.json, metrics.jsonl and
        the files the stage listed as artifacts (plots, samples, tables); never the model weights."""
        self.tracker.log_metrics({"final": result.metrics, "duration_s": result.duration_s}, result.steps)
        out = Path(result.out_dir)
        for rel in ["result.json", "metrics.jsonl", *result.artifacts.values()]:
            self.tracker.log_artifact(out / rel)


@contextmanager
def track_stage(settings: TrackingSettings | None, stage: str, config: Any, out_dir: str | Path
                ) -> Iterator[StageTracking]:
    """Track one stage run: an MLflow run named after the stage (nested under ``settings.parent_run_id``) with the
    stage config as params, TensorBoard files in ``<out_dir>/tensorboard``. Ends FAILED if the body raises."""
    tracker = open_run(settings, stage, out_dir, tags={"stage": stage, "stage_dir": str(out_dir)})
    tracker.log_params(config)
    tracking = StageTracking(tracker, settings)
    try:
        yield tracking
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
