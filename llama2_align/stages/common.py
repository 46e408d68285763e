"""The stage skeleton: what every stage's frame does, written once (ARCHITECTURE.md, "The stage skeleton").

A stage is a plain function ``run_<stage>(config, inputs, out_dir, progress=None) -> StageResult``. Its author writes
only what is particular to it, as a body decorated with :func:`stage`::

    @stage("sft")
    def run_sft(config: SFTConfig, inputs: SFTInputs, run: StageRun) -> StageOutput:
        ...                                   # validate, build, train (resume from run.resume()), save
        return StageOutput(final=..., metrics=..., steps=..., artifacts=...)

The frame returns at once when the stage is complete (and refuses, naming the fields, when that finished run had
another config or other inputs: its result would not be this call's), times the run, waits for every rank,
fingerprints the inputs, records provenance, writes ``result.json`` last (rank 0) and prunes old checkpoints.

Stage directory::

    <stage>/checkpoint-<step>/   intermediate checkpoints, each renamed into place only once complete
    <stage>/final/               the stage's output model
    <stage>/metrics.jsonl        one JSON object per logged step
    <stage>/result.json          written last, atomically: the stage is complete iff it exists
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from pydantic import BaseModel, Field, TypeAdapter

from .. import dist
from ..errors import InputError
from ..io import atomic_write_json, hash_path, read_jsonl

if TYPE_CHECKING:
    import torch

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
STAGING_DIR = ".staging"  # checkpoints are assembled here, then renamed into place whole
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

ProgressFn = Callable[[dict], None]  # called with {"stage", "step", "total", "metrics"...} as training goes

logger = logging.getLogger("llama2_align")


class StageResult(BaseModel):
    """What a stage returns and writes to result.json. Small: paths and numbers, never tensors."""

    stage: str
    status: str = "completed"
    out_dir: str
    final: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    steps: int = 0
    planned_steps: int | None = None  # the steps it set out to do; a result with fewer is not a complete stage
    duration_s: float = 0.0
    artifacts: dict[str, str] = Field(default_factory=dict)  # name -> path inside out_dir (plots, samples, tables)
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


class Backoff(Protocol):
    """What a stage config offers the out-of-memory back-off (tasks retry a stage with ``config.smaller()``)."""

    def smaller(self) -> "Backoff | None":
        """The same job with about half the memory per step (same effective batch), or None: nothing left to halve."""

    def batch_summary(self) -> str:
        """The batch settings the back-off changes, for its messages."""


# --------------------------------------------------------------------------------------------------------------------
# The skeleton
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StageOutput:
    """What a stage body returns: the part of its result only the stage knows."""

    final: str | Path | None
    metrics: dict[str, Any]
    steps: int
    artifacts: dict[str, str] = field(default_factory=dict)
    planned_steps: int | None = None  # when given, the stage is complete only if steps reached it


class IncompleteStageError(RuntimeError):
    """A stage body returned before doing every planned step: it is not marked complete."""


class StageRun:
    """One run of a stage, handed to its body: where to write, how to report progress, where to resume from."""

    def __init__(self, name: str, config: BaseModel, inputs: BaseModel, out_dir: Path, progress: ProgressFn | None):
        self.name = name
        self.config = config
        self.inputs = inputs
        self.out_dir = out_dir
        self.progress = progress
        self.provenance: dict[str, Any] = {}  # extra provenance the body adds (resume points)
        self._timer = Timer()

    def report(self, step: int, total: int, metrics: dict, **extra) -> None:
        """A progress event (the Prefect task turns it into log lines and the progress artifact)."""
        if self.progress is not None:
            self.progress({"stage": self.name, "step": step, "total": total, "metrics": metrics, **extra})

    def warn(self, message: str) -> None:
        """A warning the person running the stage must see (the task logs it; the console and the UI show it)."""
        logger.warning(message)
        if self.progress is not None:
            self.progress({"stage": self.name, "warning": message})

    def samples(self, file_name: str, fits: Callable[[dict], bool], make: Callable[[], dict]) -> dict:
        """A stage's expensive samples (generations, scores) kept in ``out_dir/file_name`` (a path relative to it): the
        file's document when it ``fits`` (same sampling settings, same policy), else ``make()``, written atomically by
        rank 0. A stage killed after sampling resumes at its fine-tune; ``provenance.resumed_from`` names the file
        reused (the last one reused, when a stage samples more than once)."""
        path = self.out_dir / file_name
        doc = json.loads(path.read_text()) if path.exists() else None
        reused = doc is not None and fits(doc)
        if not reused:
            doc = make()
            if dist.is_main():
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, doc)
        if reused or "resumed_from" not in self.provenance:
            self.provenance["resumed_from"] = str(path) if reused else None
        return doc

    def resume(self, expect: tuple[str, ...] = ()) -> Path | None:
        """The newest sound checkpoint to resume from, or None for a fresh start.

        A checkpoint is sound when every file in it opens (safetensors headers, ``.pt``/``.pth`` with
        ``weights_only=True``, JSON) and the files named in ``expect`` (glob patterns) are there. A corrupt one
        (truncated by a kill mid-save on a full disk, pieces missing, a pickle payload planted in it) is set aside as
        ``corrupt-checkpoint-<step>`` with a warning that names it and the checkpoint used instead. Metrics logged past
        the checkpoint are dropped (a fresh start drops them all), so no step appears twice in metrics.jsonl."""
        ckpt, bad = None, []
        for _, path in reversed(checkpoints(self.out_dir)):
            problem = checkpoint_problem(path, expect)
            if problem is None:
                ckpt = path
                break
            bad.append((path, problem))
        dist.barrier()  # every rank has judged the checkpoints before rank 0 moves the corrupt ones aside
        for path, problem in bad:
            instead = ckpt.name if ckpt else "a fresh start (no sound checkpoint left)"
            self.warn(f"{self.name}: {path.name} is corrupt ({problem}); set aside as corrupt-{path.name}, "
                      f"resuming from {instead}")
            if dist.is_main():
                shutil.rmtree(path.with_name(f"corrupt-{path.name}"), ignore_errors=True)
                os.replace(path, path.with_name(f"corrupt-{path.name}"))
        dist.barrier()
        if dist.is_main():
            if ckpt is None:
                (self.out_dir / METRICS_FILE).unlink(missing_ok=True)
            else:
                truncate_metrics(self.out_dir, checkpoint_step(ckpt))
        self.provenance["resumed_from"] = str(ckpt) if ckpt else None
        return ckpt

    def finish(self, output: StageOutput) -> StageResult:
        if output.planned_steps is not None and output.steps < output.planned_steps:
            raise IncompleteStageError(f"{self.name}: stopped after {output.steps} of {output.planned_steps} planned "
                                       "steps; not marked complete (rerun to resume)")
        dist.barrier()  # every rank has done its share before the stage is marked complete
        result = StageResult(
            stage=self.name,
            out_dir=str(self.out_dir),
            final=str(output.final) if output.final is not None else None,
            metrics=output.metrics,
            steps=int(output.steps),
            planned_steps=output.planned_steps,
            duration_s=round(self._timer.elapsed, 2),
            artifacts=output.artifacts,
            config=self.config.model_dump(),
            inputs=input_fingerprints(self.inputs.model_dump()),
            provenance={**provenance(), **self.provenance},
        )
        if dist.is_main():
            prune_checkpoints(self.out_dir, getattr(self.config, "keep_checkpoints", 0))
            write_result(result)
        dist.barrier()  # no rank returns before result.json exists
        return result


def stage(name: str | Callable[[Any], str]):
    """Decorate a stage body ``(config, inputs, run: StageRun) -> StageOutput`` into the stage function
    ``(config, inputs, out_dir, progress=None) -> StageResult``. ``name`` may depend on the config (the reward
    models: ``lambda c: f"reward-{c.kind}"``)."""

    def decorate(body: Callable[[Any, Any, StageRun], StageOutput]):
        @functools.wraps(body)
        def run_stage(config, inputs, out_dir: str | Path, progress: ProgressFn | None = None) -> StageResult:
            out_dir = Path(out_dir)
            done = load_result(out_dir)
            if done is not None:
                check_same_run(done, config, inputs, out_dir)
                return done
            run = StageRun(name(config) if callable(name) else name, config, inputs, out_dir, progress)
            return run.finish(body(config, inputs, run))

        params = list(inspect.signature(body).parameters.values())[:2]
        run_stage.__signature__ = inspect.Signature(  # the public signature, not the body's
            params + [inspect.Parameter("out_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str | Path"),
                      inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation="ProgressFn | None")],
            return_annotation="StageResult")
        del run_stage.__wrapped__
        return run_stage

    return decorate


# --------------------------------------------------------------------------------------------------------------------
# result.json and provenance
# --------------------------------------------------------------------------------------------------------------------


def load_result(out_dir: str | Path) -> StageResult | None:
    """The stage's result if it completed (result.json exists and records every planned step), else None."""
    path = Path(out_dir) / RESULT_FILE
    if not path.exists():
        return None
    result = StageResult.model_validate_json(path.read_text())
    if result.planned_steps is not None and result.steps < result.planned_steps:
        logger.warning(f"{path}: records {result.steps} of {result.planned_steps} planned steps: not complete")
        return None
    return moved_to(result, Path(out_dir))


def moved_to(result: StageResult, out_dir: Path) -> StageResult:
    """A finished stage directory read where it now is. A run directory copied (or moved) since it finished, to
    branch an experiment from its stages, holds result.json files naming the old location; their paths inside it
    (``out_dir``, ``final``, paths in ``metrics`` and ``artifacts``) are read as inside ``out_dir``, so the stages
    after it load the copy's checkpoints, not the original's (which may be gone). The file is left as it is: its
    hash is the stage's identity for the stages after it."""
    old, here = result.out_dir.rstrip("/"), out_dir.resolve()
    if not old or Path(old).resolve() == here:
        return result
    new = str(here)
    return result.model_copy(update={"out_dir": new, **{k: relocate(getattr(result, k), old, new)
                                                         for k in ("final", "metrics", "artifacts")}})


def relocate(value: Any, old: str, new: str) -> Any:
    """``value`` (a path string, or JSON holding some) with every path inside the directory ``old`` moved under
    ``new``; everything else as it was."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    return value


#: Config fields that say how a stage ran, not what it computed: a finished stage is reused whatever their values
#: (at any depth; micro_batch_size: the OOM back-off halves it and keeps the effective batch).
HOW_NOT_WHAT = frozenset({"progress_bar", "num_processes", "keep_checkpoints", "save_steps", "num_samples",
                          "micro_batch_size", "gradient_checkpointing", "generation_batch_size", "score_batch_size"})
#: The same, in a stage's own config only: ``enabled`` says whether the pipeline runs the stage (``lora.enabled``
#: does change what it computes).
HOW_NOT_WHAT_TOP = frozenset({"enabled"})


class FinishedWithOtherSettings(InputError):
    """A finished stage directory whose result.json records another config or other inputs than the call's."""


def _differences(a: Any, b: Any, at: str = "", defaults: Any = None) -> list[str]:
    """The dotted paths where two JSON values differ (a key on one side only counts, except a key ``a`` did not
    record whose value in ``b`` is its default in ``defaults``: a setting added after ``a`` was recorded, at the
    default that keeps what ran before)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        defaults = defaults if isinstance(defaults, dict) else {}
        for key in sorted(set(a) | set(b), key=str):
            if key in HOW_NOT_WHAT or (not at and key in HOW_NOT_WHAT_TOP):
                continue
            where = f"{at}.{key}" if at else str(key)
            if key not in a and key in defaults and b[key] == defaults[key]:
                continue
            if key not in a or key not in b:
                out.append(f"{where} ({'not recorded' if key not in a else 'no longer a setting'})")
            else:
                out += _differences(a[key], b[key], where, defaults.get(key))
        return out
    return [] if a == b else [at or "(value)"]


def _field_defaults(model: BaseModel) -> dict:
    """Each field's default (JSON), nested models' fields under their own names, as ``model_dump`` lays them out."""
    out = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = _field_defaults(value)
        elif not info.is_required():
            out[name] = _plain(TypeAdapter(info.annotation).dump_python(
                info.get_default(call_default_factory=True), mode="json"))
    return out


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _hashes(fingerprints: Any) -> Any:
    """Input fingerprints without their paths: a run directory moved or copied keeps its stages."""
    if isinstance(fingerprints, dict):
        if set(fingerprints) == {"path", "hash"}:
            return fingerprints["hash"]
        return {k: _hashes(v) for k, v in fingerprints.items()}
    if isinstance(fingerprints, list):
        return [_hashes(v) for v in fingerprints]
    return fingerprints


def config_differences(done: StageResult, config: BaseModel) -> list[str]:
    """The config fields (dotted) where a finished stage's recorded config differs from ``config``."""
    return _differences(_plain(done.config), _plain(config.model_dump(mode="json")), defaults=_field_defaults(config))


def check_same_run(done: StageResult, config: BaseModel, inputs: BaseModel, out_dir: str | Path) -> None:
    """Refuse a finished stage whose recorded config or inputs differ from this call's: returning its result would
    silently give the old run's output for new settings (a changed ``--set`` on an existing run name, or an upstream
    stage re-run after its directory was deleted)."""
    config_diff = config_differences(done, config)
    input_diff = _differences(_hashes(_plain(done.inputs)),
                              _hashes(_plain(input_fingerprints(inputs.model_dump(mode="json")))),
                              defaults=_field_defaults(inputs))
    if not config_diff and not input_diff:
        return
    what = [f"config: {', '.join(config_diff[:8])}{' ...' if len(config_diff) > 8 else ''}"] if config_diff else []
    what += [f"inputs changed: {', '.join(input_diff[:8])}"] if input_diff else []
    raise FinishedWithOtherSettings(
        f"{out_dir} holds a finished {done.stage} stage run with other settings ({'; '.join(what)}): its result is "
        f"not this run's. Use another run name, or delete {out_dir} (and the stages after it) to run it again.")


def write_result(result: StageResult) -> StageResult:
    """Mark the stage complete (result.json, written last) and drop its checkpoint staging area. Rank 0 only."""
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
            h = hashlib.sha256()
            for p in files:
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            return "stat:" + h.hexdigest()
    return "sha256:" + hash_path(path)


def input_fingerprints(inputs: Any) -> Any:
    """The inputs with every path on disk replaced by ``{"path", "hash"}``, at any depth (eval's checkpoints are a
    name -> path mapping); presets and other values are kept as they are."""
    if isinstance(inputs, dict):
        return {name: input_fingerprints(value) for name, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [input_fingerprints(value) for value in inputs]
    if isinstance(inputs, (str, Path)) and Path(inputs).exists():
        return {"path": str(Path(inputs).resolve()), "hash": fingerprint(inputs)}
    return inputs


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
    import torch

    from ..device import describe_device, resolve_device

    device = resolve_device("auto") if device is None else torch.device(device)
    return {
        "versions": library_versions(),
        "git_commit": _git_commit(),
        "device": describe_device(device),
        "world_size": dist.world_size(),
        "host": platform.node(),
        "pid": os.getpid(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints and metrics
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


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


def checkpoint_problem(path: Path, expect: tuple[str, ...] = ()) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it is sound (see ``StageRun.resume``)."""
    from .. import dcp

    for pattern in expect:
        if not any(path.glob(pattern)):
            return f"{pattern} is missing"
    for index in sorted(path.rglob(dcp.METADATA_FILE)):  # a DCP checkpoint inside (sharded models, optimizers)
        problem = dcp.problem(index.parent)
        if problem is not None:
            return problem
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(f, "pt"):
                    pass
            elif f.suffix in (".pt", ".pth"):
                # exactly what transformers' resume accepts: tensors, plain containers and numpy arrays (its RNG
                # state), no other object, so a planted pickle payload fails here instead of running
                import torch
                from transformers.trainer_pt_utils import safe_globals

                with safe_globals():
                    torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except Exception as exc:  # any way a file fails to open makes the checkpoint unusable
            return f"{rel}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (rank 0; ``keep`` <= 0 keeps all)."""
    if keep <= 0 or not dist.is_main():
        return
    for _, path in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def truncate_metrics(out_dir: str | Path, after_step: int) -> None:
    """On resume, drop logged lines past the checkpoint we resume from, so no step appears twice."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists() or not dist.is_main():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def logged_losses(out_dir: str | Path, key: str = "loss") -> dict[str, float]:
    """``train_loss_first`` / ``train_loss_last`` from metrics.jsonl (empty when nothing was logged)."""
    losses = [r[key] for r in read_jsonl(Path(out_dir) / METRICS_FILE) if key in r]
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1]} if losses else {}


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
