"""Where this process stands among its peers under torchrun, and the few collectives the stages use.

One source of truth: ``torch.distributed`` once the process group is up (the launcher and the HF Trainer start it),
else torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process. Every collective is a
no-op in a single process, so stage code is written once for one process and for many.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------------------------------------------------
# How the processes of a launched stage find each other (a stage config's ``launch`` field)
# --------------------------------------------------------------------------------------------------------------------


class LaunchSettings(BaseModel):
    """Where a launched stage's processes run: this node's place in a multi-node job (torchrun's c10d rendezvous).

    ``num_processes`` (the stage config's own field) stays the processes per node. With ``num_nodes`` 1 the stage
    runs under ``torchrun --standalone``; with more, every node runs the same launch with its own ``node_rank`` and
    the same ``rdzv_endpoint`` (a host every node reaches, usually node 0's, and a free port) and ``rdzv_id``.
    ``llama2_align.launch`` runs it."""

    model_config = ConfigDict(extra="forbid")

    num_nodes: int = Field(1, ge=1, description="nodes in the job (torchrun --nnodes)")
    node_rank: int = Field(0, ge=0, description="this node's rank, 0 .. num_nodes-1: names its logs; with the static "
                                                "rendezvous it also fixes its global ranks (torchrun --node_rank)")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the c10d rendezvous (needed on >1 node)")
    rdzv_id: str = Field("llama2-align", pattern=r"^[A-Za-z0-9._-]+$",
                         description="job id shared by every node of one launch (a new one per job)")
    rdzv_timeout_s: int = Field(900, ge=1, description="how long a node waits for the others to join")
    rdzv_backend: Literal["c10d", "static"] = Field(
        "c10d", description="c10d: torchrun hands out the global ranks itself (nodes ordered by address); static: "
                            "node_rank decides and the endpoint is node 0's master address")

    @model_validator(mode="after")
    def _check(self):
        if self.node_rank >= self.num_nodes:
            raise ValueError(f"launch.node_rank ({self.node_rank}) must be below launch.num_nodes ({self.num_nodes})")
        if self.num_nodes > 1:
            if not self.rdzv_endpoint:
                raise ValueError("launch.rdzv_endpoint (HOST:PORT, reachable from every node) is needed when "
                                 f"launch.num_nodes is {self.num_nodes}")
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"launch.rdzv_endpoint {self.rdzv_endpoint!r}: expected HOST:PORT, e.g. "
                                 "node0.cluster:29400")
        return self

    @property
    def multi_node(self) -> bool:
        return self.num_nodes > 1

    def torchrun_args(self, nproc_per_node: int) -> list[str]:
        """torchrun's arguments for this node."""
        if not self.multi_node:
            return ["--standalone", f"--nproc_per_node={nproc_per_node}"]
        args = [f"--nnodes={self.num_nodes}", f"--nproc_per_node={nproc_per_node}",
                f"--rdzv_backend={self.rdzv_backend}", f"--rdzv_endpoint={self.rdzv_endpoint}",
                f"--rdzv_id={self.rdzv_id}", f"--rdzv_conf=join_timeout={self.rdzv_timeout_s}", "--max_restarts=0"]
        if self.rdzv_backend == "static":  # c10d ignores --node_rank (torchrun warns)
            args.insert(1, f"--node_rank={self.node_rank}")
        return args


# --------------------------------------------------------------------------------------------------------------------
# Rank, world size and collectives
# --------------------------------------------------------------------------------------------------------------------


def _group():
    """The initialised default process group's module, or None in a single process."""
    if "torch" not in sys.modules:
        return None  # no process group without torch: the configs and their checks run without loading it
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
    import torch

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
