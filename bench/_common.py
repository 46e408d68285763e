"""Shared helpers for the benchmarks: device tables, timing, table printing, random-weight models."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s) by device name (first matching key wins).
HBM_BANDWIDTH = [("H200", 4.8e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.0e12), ("A100 80GB", 2.0e12),
                 ("A100", 2.0e12)]
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12)]


def lookup(table, name: str):
    for key, value in table:
        if key.lower() in name.lower():
            return value
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":  # pragma: no cover - GPU only
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def measure_bandwidth(device: torch.device, gib: float = 2.0) -> float:  # pragma: no cover - GPU only
    """Device-to-device copy bandwidth (read + write bytes / s) of a large buffer."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # pragma: no cover - GPU only
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def random_model(preset: str, device: torch.device, dtype: torch.dtype, vocab_size: int | None = None,
                 role: str = "policy", lora=None):
    """A preset with random weights. On CUDA the big presets are built on the meta device, then ``to_empty`` on the
    GPU and initialised there (no 13 GB fp32 detour through host memory)."""
    from llama2_align.model import _model_class, _prepare_config, build_model, llama_config

    if device.type != "cuda":
        return build_model(preset, role, device=device, dtype=dtype, vocab_size=vocab_size, lora=lora)
    config = _prepare_config(llama_config(preset, vocab_size=vocab_size), role)  # pragma: no cover - GPU only
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = _model_class(role)(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, config.initializer_range)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        for mname, module in list(model.named_modules()):
            if isinstance(module, LlamaRotaryEmbedding):
                parent, _, attr = mname.rpartition(".")
                setattr(model.get_submodule(parent), attr, LlamaRotaryEmbedding(config=config).to(device))
    if lora is not None and lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config(role))
    return model


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:,.4g}" if isinstance(c, float)
                                             else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
