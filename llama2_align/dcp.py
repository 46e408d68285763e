"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP): sharded save and resume, at another world size
where DCP allows, with no pickle executed on load.

A checkpoint holds named parts, each a model and (optionally) its optimizer:

- the model's trainable parameters (frozen ones, a LoRA base, are the stage's input and are not copied) and the
  optimizer's tensors (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), keyed by parameter name: each
  rank writes its own shards (``__<rank>_0.distcp``) and rank 0 the index (``.metadata``);
- the optimizer's param groups (learning rate, betas, ..., parameter names) in ``param_groups.json``: DCP would
  pickle them.

Loading never runs pickled code: DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and its planner loads
non-tensor values with an unrestricted ``torch.load``. Here the index is read by an unpickler that builds only
DCP's metadata classes, shapes, dtypes, layouts and paths (anything else is refused), tensors are read by DCP with
``weights_only=True``, and a checkpoint holds no non-tensor values (a planner that meets one refuses it).

Resharding: DCP reads the slices each rank's current tensors need, so a checkpoint written by N FSDP ranks loads on
M ranks, or in one process into plain tensors, and a single-process checkpoint loads into FSDP shards.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dist

GROUPS_FILE = "param_groups.json"
METADATA_FILE = ".metadata"

Part = tuple[nn.Module, "torch.optim.Optimizer | None"]


# --------------------------------------------------------------------------------------------------------------------
# Loading without pickle
# --------------------------------------------------------------------------------------------------------------------

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
# what DCP's index refers to besides its own classes: shapes, layouts (looked up by name), a checkpoint id path
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                 ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"),
                 ("builtins", "frozenset")}


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's metadata objects and nothing else."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{self.path}: a checkpoint index may only hold DCP metadata; refusing to load "
                                     f"{module}.{name}")


def read_metadata(path: str | Path):
    """A DCP checkpoint's index (``.metadata``), read without running pickled code."""
    path = Path(path) / METADATA_FILE
    with open(path, "rb") as f:
        return _IndexUnpickler(f, path).load()


def problem(path: str | Path) -> str | None:
    """Why the DCP checkpoint at ``path`` cannot be loaded, or None: its index opens (without pickle) and every shard
    file it names is there and long enough (a kill mid-save leaves a truncated or missing shard)."""
    path = Path(path)
    try:
        metadata = read_metadata(path)
    except Exception as exc:
        return f"{path.name}/{METADATA_FILE}: {type(exc).__name__}: {str(exc)[:200]}"
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = path / name
        if not shard.is_file():
            return f"{path.name}/{name} is missing"
        if shard.stat().st_size < end:
            return f"{path.name}/{name} is truncated ({shard.stat().st_size} of {end} bytes)"
    return None


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor: refusing to unpickle it")

    return TensorsOnlyPlanner()


# --------------------------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------------------------


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """The model's trainable tensors and the optimizer's state, sharded as the model is (a fresh optimizer's state
    is created first, with a zero step at learning rate 0, so there is something to load into)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model, options=_options()), {}
    return get_state_dict(model, _bare(optimizer), options=_options())


def _bare(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _jsonable(groups: list[dict]) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def save(path: str | Path, parts: dict[str, Part]) -> Path:
    """Write ``parts`` (name -> (model, optimizer or None)) as a DCP checkpoint in the directory ``path``. Every rank
    calls it (a collective); rank 0 writes the index and ``param_groups.json``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    path = Path(path)
    tensors: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for name, (model, optimizer) in parts.items():
        model_state, optim_state = _state(model, optimizer)
        tensors[name] = model_state
        if optimizer is not None:
            tensors[f"{name}_optimizer"] = optim_state["state"]
            groups[name] = _jsonable(optim_state["param_groups"])
    non_tensors = [k for part in tensors.values() for k, v in _leaves(part) if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"not a tensor, would be pickled: {non_tensors[:5]}")
    with _single_process_quiet():
        dcp.save(tensors, storage_writer=FileSystemWriter(str(path)))
    if dist.is_main():
        from .io import atomic_write_json

        atomic_write_json(path / GROUPS_FILE, groups)
    dist.barrier()
    return path


def load(path: str | Path, parts: dict[str, Part]) -> None:
    """Load ``parts`` (as built for a fresh start, sharded or not) from the DCP checkpoint at ``path``, in place:
    the trainable parameters, and the optimizers' state and param groups. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    if not (path / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a DCP checkpoint (no {METADATA_FILE})")
    read_metadata(path)  # a refused index fails here, with its own message (inside DCP it is wrapped per rank)
    groups = json.loads((path / GROUPS_FILE).read_text())
    targets: dict[str, dict] = {}
    for name, (model, optimizer) in parts.items():
        model_state, optim_state = _state(model, optimizer)
        targets[name] = model_state
        if optimizer is not None:
            targets[f"{name}_optimizer"] = optim_state["state"]
    with _single_process_quiet():
        dcp.load(targets, storage_reader=_reader(path), planner=_planner())
    for name, (model, optimizer) in parts.items():
        if optimizer is None:
            set_model_state_dict(model, targets[name], options=_options())
        else:
            set_state_dict(model, _bare(optimizer), model_state_dict=targets[name], options=_options(),
                           optim_state_dict={"state": targets[f"{name}_optimizer"], "param_groups": groups[name]})


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call in a single process (no process group) that it assumes one: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _leaves(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), tree
