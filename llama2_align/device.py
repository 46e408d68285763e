"""Device and dtype policy, in one place: CUDA -> bf16, everything else -> fp32 (overridable)."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` picks this process's CUDA device (LOCAL_RANK under torchrun) when present, else the CPU."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str | None = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """`auto` gives bf16 on CUDA and fp32 elsewhere."""
    if name in (None, "auto"):
        device = resolve_device("auto") if device is None else torch.device(device)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: expected one of auto, {', '.join(sorted(_DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
