"""Device and dtype policy, in one place: CUDA -> bf16, everything else -> fp32 (overridable).

Light to import (torch loads when a function runs), like every module a config needs: ``tests/unit/
test_light_imports.py``."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Callable, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable)

#: dtype names a config may give, and the torch dtype attribute each names
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` picks this process's CUDA device (LOCAL_RANK under torchrun) when present, else the CPU."""
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str | None = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """`auto` gives bf16 on CUDA and fp32 elsewhere."""
    import torch

    if name in (None, "auto"):
        device = resolve_device("auto") if device is None else torch.device(device)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}: expected one of auto, {', '.join(sorted(DTYPE_NAMES))}")
    return getattr(torch, DTYPE_NAMES[name])


def dtype_name(dtype: torch.dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def describe_device(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def no_grad(fn: F) -> F:
    """``@torch.no_grad()`` for a function (not a generator) of a module that must import without torch: torch
    loads when ``fn`` is called."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
