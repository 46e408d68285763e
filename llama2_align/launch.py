"""Run a stage on several processes (GPUs) under torchrun, as a subprocess of the caller (ARCHITECTURE.md).

The parent side, :func:`launch_stage`, writes a small spec (stage, config, inputs, out_dir) into
``<out_dir>/.launch/spec.json`` and runs::

    python -m torch.distributed.run --standalone --nproc_per_node N --tee 3 --log-dir <out_dir>/.launch/logs \\
        -m llama2_align.launch <out_dir>/.launch/spec.json

On several nodes (:class:`LaunchSettings`, the ``launch`` field of a stage config), the same command runs once per
node with torchrun's c10d rendezvous instead of ``--standalone``: ``--nnodes M --rdzv_backend c10d
--rdzv_endpoint HOST:PORT --rdzv_id ID`` (or the static rendezvous, where ``--node_rank R`` fixes the ranks).
Every node must see ``out_dir`` (shared storage): rank 0 writes there and every node reads ``result.json`` back.

streaming every output line (prefixed ``[rankR]``) into a log callback. On success it reads ``result.json`` back;
on failure it raises :class:`LaunchError` (a ``RuntimeError``) with the exit code, the failing rank's exception and
the last lines of output.

The child side, :func:`main`, is the per-rank entry point: it initialises the process group (gloo on CPU, nccl on
CUDA), pins ``cuda:LOCAL_RANK``, calls the stage's ``run_<stage>`` (which is written to run under torchrun: rank-0
writes, sharded work) and tears the group down. Rank 0's progress events travel to the parent as marked JSON lines,
so the caller's ``progress`` callback (the Prefect progress artifact) keeps working across the process boundary.
No Prefect here.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from .dist import LaunchSettings  # noqa: F401 - the stage configs' launch field, re-exported for callers here
from .errors import ConfigError, InputError
from .procs import die_with_parent, set_parent_death_signal
from .stages.common import ProgressFn, StageResult, load_result

LAUNCH_DIR = ".launch"
SPEC_FILE = "spec.json"
TAIL_LINES = 40
PROGRESS_MARKER = "@@llama2_align.progress "

# stage -> (module, config class, inputs class, run function), imported lazily
STAGES: dict[str, tuple[str, str, str, str]] = {
    "sft": ("llama2_align.stages.sft", "SFTConfig", "SFTInputs", "run_sft"),
    "reward": ("llama2_align.stages.reward", "RewardConfig", "RewardInputs", "run_reward"),
    "ppo": ("llama2_align.stages.ppo", "PPOConfig", "PPOInputs", "run_ppo"),
    "rejection-sampling": ("llama2_align.stages.rejection_sampling", "RejectionSamplingConfig", "RSInputs",
                           "run_rejection_sampling"),
}

_TORCHRUN_PREFIX = re.compile(r"^\[default(\d+)\]:")


def launch_settings(config: Any) -> LaunchSettings:
    """A stage config's launch settings (the defaults, one node, when it has none)."""
    launch = getattr(config, "launch", None)
    return launch if isinstance(launch, LaunchSettings) else LaunchSettings()


class LaunchError(RuntimeError):
    """A launched stage failed. ``validation_error`` is true when the failing rank refused its inputs (a data or
    config error: retrying cannot help)."""

    def __init__(self, message: str, exit_code: int, error: dict | None = None, tail: list[str] | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.error = error or {}
        self.tail = tail or []

    @property
    def validation_error(self) -> bool:
        return bool(self.error.get("validation"))


def should_launch(config: Any) -> bool:
    """A stage runs under torchrun when its config asks for more than one process, or for more than one node."""
    return int(getattr(config, "num_processes", 1) or 1) > 1 or launch_settings(config).multi_node


def stage_key(stage: str) -> str:
    """The registry key of a stage name (``reward-helpfulness`` -> ``reward``)."""
    if stage in STAGES:
        return stage
    for key in STAGES:
        if stage.startswith(key + "-"):
            return key
    raise ConfigError(f"no launchable stage {stage!r}: expected one of {', '.join(STAGES)}")


def _lookup(stage: str):
    module, config_cls, inputs_cls, fn = STAGES[stage_key(stage)]
    mod = importlib.import_module(module)
    return getattr(mod, config_cls), getattr(mod, inputs_cls), getattr(mod, fn)


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


# --------------------------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------------------------

def _error_files(launch_dir: Path) -> list[Path]:
    return sorted(launch_dir.glob("error-rank*.json"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))


def launch_stage(stage: str, config: BaseModel, inputs: BaseModel, out_dir: str | Path, num_processes: int,
                 log: Callable[[str], None] = print, backend: str | None = None,
                 progress: ProgressFn | None = None, launch: LaunchSettings | None = None) -> StageResult:
    """Run ``stage`` on ``num_processes`` processes (per node) under torchrun; return its result (at once when
    complete). ``launch`` (default: the config's ``launch`` field) places this call in a multi-node job: call it
    once on every node, each with its own ``node_rank``."""
    launch = launch or launch_settings(config)
    out_dir = Path(out_dir).resolve()
    done = load_result(out_dir)
    if done is not None:
        return done
    stage_key(stage)  # an unknown stage fails here, not in N subprocesses
    launch_dir = out_dir / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    if launch.node_rank == 0:
        for old in _error_files(launch_dir):
            old.unlink(missing_ok=True)
    spec = {"stage": stage, "config": config.model_dump(mode="json"), "inputs": inputs.model_dump(mode="json"),
            "out_dir": str(out_dir), "backend": backend or default_backend()}
    spec_path = launch_dir / SPEC_FILE
    tmp = spec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, spec_path)

    logs = launch_dir / "logs" / (f"node{launch.node_rank}" if launch.multi_node else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch.torchrun_args(num_processes),
           "--tee=3", f"--log-dir={logs}", "-m", "llama2_align.launch", str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    where = f" on node {launch.node_rank} of {launch.num_nodes}" if launch.multi_node else ""
    label = f"node{launch.node_rank}." if launch.multi_node else "rank"
    log(f"{stage}: launching {num_processes} processes{where} ({spec['backend']}): {' '.join(cmd[1:])}")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    # torchrun gets SIGTERM when this process dies (even by SIGKILL) and stops its ranks; the ranks die with it
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          errors="replace", env=env, preexec_fn=die_with_parent(signal.SIGTERM)) as proc:
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                m = _TORCHRUN_PREFIX.match(line)
                body = line[m.end():] if m else line
                if progress is not None and body.startswith(PROGRESS_MARKER):
                    try:
                        progress(json.loads(body[len(PROGRESS_MARKER):]))
                    except Exception as exc:  # progress is a convenience: never fail the run over it
                        log(f"{stage}: progress callback failed: {exc!r}")
                    continue
                if body.startswith(PROGRESS_MARKER):
                    continue
                line = f"[{label}{m.group(1)}] {body}" if m else line
                tail.append(line)
                log(line)
            rc = proc.wait()
        except BaseException:  # interrupted (task cancelled): take the workers down with us
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc == 0:
        result = load_result(out_dir)
        if result is None:
            shared = (f" (node {launch.node_rank}: out_dir must be on storage every node shares)"
                      if launch.multi_node else "")
            raise LaunchError(f"{stage}: torchrun exited with code 0 but wrote no {out_dir / 'result.json'}{shared}",
                              rc, tail=list(tail))
        return result
    error = None
    for f in _error_files(launch_dir):
        try:
            error = json.loads(f.read_text())
            break
        except (OSError, ValueError):
            continue
    what = f": rank {error['rank']} raised {error['type']}: {error['message']}" if error else ""
    raise LaunchError(f"{stage}: torchrun ({num_processes} processes{where}) failed with exit code {rc}{what}\n"
                      f"--- last {len(tail)} lines of output ---\n" + "\n".join(tail), rc, error, list(tail))


# --------------------------------------------------------------------------------------------------------------------
# Child side (one per rank)
# --------------------------------------------------------------------------------------------------------------------

def _print_progress(event: dict) -> None:
    print(PROGRESS_MARKER + json.dumps(event, default=str), flush=True)


def _is_validation(exc: BaseException) -> bool:
    from pydantic import ValidationError

    return isinstance(exc, (InputError, ValidationError))


def run_rank(spec_path: str | Path) -> StageResult:
    """Run this rank's share of the stage described by ``spec_path``."""
    import torch
    import torch.distributed as tdist

    from . import dist

    set_parent_death_signal(signal.SIGKILL)  # a rank never outlives its torchrun agent
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    rank, local_rank = dist.rank(), dist.local_rank()  # torchrun's environment: the group is not up yet
    backend = spec.get("backend") or default_backend()
    try:
        config_cls, inputs_cls, run_fn = _lookup(spec["stage"])
        config = config_cls.model_validate(spec["config"])
        inputs = inputs_cls.model_validate(spec["inputs"])
        kwargs: dict[str, Any] = {}
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            if backend == "nccl":
                kwargs["device_id"] = torch.device("cuda", local_rank)
        if not tdist.is_initialized():
            tdist.init_process_group(backend, **kwargs)
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        print(f"{spec['stage']}: rank {rank} of {dist.world_size()} on {device} ({backend}) -> {out_dir}",
              flush=True)
        try:  # the stage skeleton waits for every rank before and after rank 0 writes result.json
            return run_fn(config, inputs, out_dir, progress=_print_progress if rank == 0 else None)
        finally:
            tdist.destroy_process_group()
    except BaseException as exc:
        err = {"rank": rank, "type": type(exc).__name__, "message": str(exc)[:4000],
               "validation": _is_validation(exc)}
        try:
            path = out_dir / LAUNCH_DIR / f"error-rank{rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(err))
        except OSError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m torch.distributed.run ... -m llama2_align.launch <spec.json>", file=sys.stderr)
        return 2
    record(run_rank)(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
