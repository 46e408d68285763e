"""Build the demo world: datasets and tokenizer (the offline default inputs of every other flow)."""

from __future__ import annotations

from typing import Literal

from prefect import flow

from tasks.demo import demo_data_task


@flow(name="demo-prep", log_prints=True)
def demo_prep(out_dir: str = "runs/demo", seed: int = 0, sizes: Literal["default", "micro"] = "default",
              vocab_size: int = 2048) -> dict[str, str]:
    """Write ``<out_dir>/data/*.jsonl`` and ``<out_dir>/tokenizer``; returns their paths."""
    return demo_data_task(out_dir, seed, sizes, vocab_size)
