"""Where this process stands among its peers under torchrun, and the few collectives the stages use.

One source of truth: ``torch.distributed`` once the process group is up (the launcher and the HF Trainer start it),
else torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process. Every collective is a
no-op in a single process, so stage code is written once for one process and for many.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch


def _group():
    """The initialised default process group's module, or None in a single process."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    d = _group()
    return d.get_rank() if d else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    d = _group()
    return d.get_world_size() if d else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (its GPU); torchrun sets it, the process group does not know it."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """Whether a process group is up (under torchrun, even of one process)."""
    return _group() is not None


def is_main() -> bool:
    """Rank 0: the process that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank."""
    d = _group()
    if d is not None:
        d.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``x`` over all ranks (a new tensor; ``x`` is untouched)."""
    d = _group()
    if d is None:
        return x
    x = x.clone()
    d.all_reduce(x)
    return x


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``x`` over all ranks."""
    return all_sum(x) / world_size()


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on each) concatenated along dim 0, in rank order."""
    d = _group()
    if d is None:
        return x
    parts = [torch.empty_like(x) for _ in range(d.get_world_size())]
    d.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Data-parallel gradient sync: every gradient becomes its mean over the ranks. A sharded gradient (a
    ``DTensor``: FSDP reduce-scattered it, already averaged) is left alone, so nothing is reduced twice."""
    d = _group()
    if d is None:
        return
    from torch.distributed.tensor import DTensor

    n = d.get_world_size()
    for p in params:
        if p.grad is not None and not isinstance(p.grad, DTensor):
            d.all_reduce(p.grad)
            p.grad /= n
